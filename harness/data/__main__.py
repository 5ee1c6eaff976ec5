"""Preview training data: ``python -m harness.data arithmetic:ops=+-*,n=100 --show 3``.

Prints the number of records and the first few as JSON; bad input is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from harness.data.records import DEFAULT_TRAIN_DATA, load_records
from harness.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.data", description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default=DEFAULT_TRAIN_DATA,
                        help="named set, local path, URL, or arithmetic[:options] (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="benchmark files (default: $HARNESS_DATA_DIR or the cache)")
    parser.add_argument("--limit", type=int, default=None, help="keep a seeded sample of this many records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train",
                        help="train, validation (a file's held-out slice) or, for the generator, test (default: train)")
    parser.add_argument("--show", type=int, default=3, help="records to print")
    args = parser.parse_args(argv)
    records = load_records(args.source, args.data_dir, limit=args.limit, seed=args.seed, split=args.split)
    print(f"{len(records)} {args.split} records from {args.source}")
    for record in records[: args.show]:
        print(json.dumps(record, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
