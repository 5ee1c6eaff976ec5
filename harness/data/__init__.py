"""What the harness trains on: benchmark files, the arithmetic generator, prompts and tokenisation.

- ``files``: the data directory and downloads of missing upstream files;
- ``arithmetic``: the seeded generator (train, validation and test splits disjoint by construction);
- ``records``: ``load_records`` for named sets, paths, URLs and the generator, with each file's
  validation split held out (``split="validation"`` returns it; ``load_validation`` by source task),
  and ``records_checksum``;
- ``validation``: the validation split stratified by source task, and ``validation_sizes`` (what each
  task scores when tuning);
- ``prompts``: the alpaca and chat prompt formats, shared with the lm-eval tasks;
- ``tokenize``: ``build_train_dataset``, ``collate`` and ``collate_for``.
"""

from harness.data.arithmetic import ArithmeticSpec, generate, parse_spec
from harness.data.files import DATA_DIR_ENV, data_file, resolve_data_dir
from harness.data.prompts import PROMPT_FORMATS, format_prompt
from harness.data.records import (DEFAULT_TRAIN_DATA, TEST_SETS, TRAIN_SETS, load_records, load_test_records,
                                  load_validation, records_checksum, validation_sizes)
from harness.data.tokenize import IGNORE_INDEX, build_train_dataset, collate, collate_for

__all__ = [
    "ArithmeticSpec", "DATA_DIR_ENV", "DEFAULT_TRAIN_DATA", "IGNORE_INDEX", "PROMPT_FORMATS", "TEST_SETS",
    "TRAIN_SETS", "build_train_dataset", "collate", "collate_for", "data_file", "format_prompt", "generate",
    "load_records", "load_test_records", "load_validation", "parse_spec", "records_checksum", "resolve_data_dir",
    "validation_sizes",
]
