"""Score one adapter through every evaluation path a user might take, on the same items, and show where they differ.

``python -m harness.equivalence results/<run>/adapters/linchain-3-seed0 --limit 100``

The paths:

- ``harness``: the harness in-process with the adapter unmerged (what ``harness.run`` reports);
- ``merged``: the same adapter merged into the base weights (``merge_and_unload``), in-process;
- ``lm-eval``: lm-eval's own command line on the adapter's plain-LoRA export
  (``--model hf --model_args pretrained=<base>,peft=<export>,dtype=...``), in a separate process;
- ``vllm``: lm-eval's vLLM backend with the export (``--model vllm ... lora_local_path=<export>``), only where
  a CUDA GPU and the ``vllm`` package are present (an optional extra; never needed for the tests).

Each runs in fp32, and in bf16 where the hardware runs bf16 fast (or when ``--precisions fp32,bf16`` asks
for it anyway). Every path is compared item by item with the harness in fp32: the items whose correctness
flips and those whose extracted answer differs. The base model is scored once in fp32 as well.

The report fails (exit 1) when, in fp32, the merged or lm-eval path differs from the harness on any item,
or when the adapter's raw outputs equal the base model's on every item (an adapter that was not applied,
the class of bug where a loader drops the weights and scores the base model). In bf16 disagreement is
expected (rounding in a different order changes some greedy decodes) and reported as a rate.

Writes ``equivalence.md``, ``equivalence.csv`` (one row per path and precision) and ``items.csv`` (one row
per path, precision and item) into ``--output-dir`` (default ``results/equivalence/<adapter name>``).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import quiet
from harness.adapters.api import check_adapter_fits, export_lora, load_adapter_model, read_adapter_folder
from harness.adapters.spec import parse_spec
from harness.data.files import resolve_data_dir
from harness.data.prompts import PROMPT_FORMATS
from harness.errors import UserError, cli_entry
from harness.evaluate import (DEFAULT_TASKS, PRIMARY_FILTER, TASKS_DIR, AdapterSource, Sample, TaskSuite, _sample,
                              default_batch_size, locate_adapter)
from harness.export import vllm_rank
from harness.fsutil import atomic_path, write_text_atomic
from harness.models import bf16_is_fast, load_model, storage_dtype
from harness.quiet import OFFLINE_ENVIRONMENT

PATHS = ("harness", "merged", "lm-eval", "vllm")
MUST_AGREE = ("merged", "lm-eval")  # in fp32, these must give the harness's answer on every item
REFERENCE = ("harness", "fp32")
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
EXAMPLES = 5  # disagreeing items shown per path in equivalence.md
ItemKey = tuple[str, int]  # (task, doc_id)


@dataclass
class PathResult:
    """One evaluation path at one precision: its per-item samples, or why it did not run."""

    path: str
    precision: str
    samples: dict[ItemKey, Sample] = field(default_factory=dict)
    seconds: float = float("nan")
    skipped: str | None = None

    def accuracy(self) -> float:
        return sum(s.correct for s in self.samples.values()) / len(self.samples) if self.samples else float("nan")


@dataclass
class Agreement:
    """How a path's items compare with the reference's: on the items both scored."""

    items: int
    flips: list[ItemKey]  # correctness differs
    answers: list[ItemKey]  # extracted answer differs (a superset of the flips, for exact-match tasks)
    missing: int  # items one of the two did not score

    @property
    def flip_rate(self) -> float:
        return len(self.flips) / self.items if self.items else float("nan")

    @property
    def identical(self) -> bool:
        return not self.answers and not self.missing and self.items > 0


def agreement(reference: PathResult, other: PathResult) -> Agreement:
    shared = sorted(set(reference.samples) & set(other.samples))
    flips = [k for k in shared if reference.samples[k].correct != other.samples[k].correct]
    answers = [k for k in shared if reference.samples[k].response != other.samples[k].response]
    missing = len(set(reference.samples) ^ set(other.samples))
    return Agreement(len(shared), flips, answers, missing)


def same_raw_outputs(a: PathResult, b: PathResult) -> bool:
    """True when two paths produced the same raw output (text, or choice log-likelihoods) on every shared item."""
    shared = set(a.samples) & set(b.samples)
    return bool(shared) and all(a.samples[k].output == b.samples[k].output for k in shared)


# ----------------------------------------------------------------------------------------------------------
# The paths


def by_item(samples: dict[str, list[Sample]]) -> dict[ItemKey, Sample]:
    return {(task, s.doc_id): s for task, items in samples.items() for s in items}


def _in_process(source: AdapterSource, model_name: str, precision: str, options: dict, work: Path,
                progress, merged_too: bool) -> tuple[list[PathResult], Path | None]:
    """The base model (fp32 only), the harness path and (``merged_too``) the merged path at one precision.

    In fp32 it also writes the base model's and the adapter's plain-LoRA export into ``work`` for the
    lm-eval and vLLM paths, and returns where.
    """
    import torch

    results = []
    model, tokenizer = load_model(model_name, dtype=storage_dtype(precision))
    check_adapter_fits(model, source.folder)
    batch_size = options["batch_size"] or default_batch_size(model)
    suite = options.get("suite") or TaskSuite(options["tasks"], options["data_dir"], options["prompt_format"])

    def score(which: str, m) -> PathResult:
        progress(which, precision)
        started = time.perf_counter()
        result = suite.evaluate(m, tokenizer, limit=options["limit"], batch_size=batch_size, precision=precision,
                                check_precision=False)
        return PathResult(which, precision, by_item(result.samples), time.perf_counter() - started)

    saved = None
    if precision == "fp32":
        results.append(score("base", model))
        saved = work / "base"
        model.save_pretrained(str(saved), safe_serialization=True)
        tokenizer.save_pretrained(str(saved))
    peft_model = load_adapter_model(model, source.folder)
    results.append(score("harness", peft_model))
    if precision == "fp32":
        export_lora(peft_model, work / "export")
    if merged_too:
        with torch.no_grad():
            merged = peft_model.merge_and_unload()
        results.append(score("merged", merged))
        del merged
    del model, peft_model
    return results, saved


def _lm_eval_command(backend: str, base: Path, export: Path, precision: str, options: dict, out: Path,
                     rank: int | None) -> list[str]:
    model_args = f"pretrained={base},dtype={PRECISION_DTYPES[precision]}"
    if backend == "hf":
        model_args += f",peft={export}"
    else:
        model_args += f",lora_local_path={export},max_lora_rank={rank},enforce_eager=True"
    metadata = {"data_dir": options["data_dir_resolved"], "prompt_format": options["prompt_format"], "split": "test"}
    command = [sys.executable, "-m", "lm_eval", "run", "--model", backend, "--model_args", model_args,
               "--include_path", str(TASKS_DIR), "--tasks", ",".join(options["tasks"]),
               "--batch_size", str(options["batch_size"] or (16 if backend == "hf" else "auto")),
               "--log_samples", "--output_path", str(out), "--metadata", json.dumps(metadata)]
    if backend == "hf":
        command += ["--device", "cpu" if not _cuda() else "cuda"]
    if options["limit"] is not None:
        command += ["--limit", str(options["limit"])]
    if options["prompt_format"] == "chat":
        command += ["--apply_chat_template"]
    return command


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _lm_eval_path(which: str, base: Path, export: Path, precision: str, options: dict, work: Path,
                  progress) -> PathResult:
    """lm-eval's command line (hf backend with peft=, or vllm with lora_local_path=) on the export."""
    if which == "vllm":
        if not _cuda():
            return PathResult(which, precision, skipped="no CUDA GPU here")
        if importlib.util.find_spec("vllm") is None:
            return PathResult(which, precision, skipped="vllm is not installed (pip install vllm)")
    progress(which, precision)
    out = work / f"{which}-{precision}"
    rank = vllm_rank(int(json.loads((export / "adapter_config.json").read_text())["r"]))
    if which == "vllm" and rank is None:
        return PathResult(which, precision, skipped="r is above every --max-lora-rank vLLM accepts")
    command = _lm_eval_command("hf" if which == "lm-eval" else "vllm", base, export, precision, options, out, rank)
    env = {**os.environ, **OFFLINE_ENVIRONMENT, "HARNESS_DATA_DIR": options["data_dir_resolved"]}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        last = next((line for line in reversed(done.stderr.strip().splitlines()) if line.strip()), "no output")
        raise UserError(f"lm-eval's command line ({which}, {precision}) failed: {last.strip()} "
                        f"(the command: {' '.join(command)})")
    return PathResult(which, precision, read_lm_eval_samples(out), seconds)


SAMPLES_FILE = re.compile(r"samples_(?P<task>.+)_\d{4}-\d{2}-\d{2}T[\d\-.:]+\.jsonl$")


def read_lm_eval_samples(out: Path) -> dict[ItemKey, Sample]:
    """The per-item samples lm-eval's ``--log_samples`` wrote under ``out``, read as the harness reads its own."""
    items: dict[ItemKey, Sample] = {}
    for path in sorted(out.rglob("samples_*.jsonl")):
        match = SAMPLES_FILE.search(path.name)
        if not match:
            continue
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("filter", "none") in (PRIMARY_FILTER, "none"):
                sample = _sample(record)
                items[(match["task"], sample.doc_id)] = sample
    return items


# ----------------------------------------------------------------------------------------------------------
# The report


@dataclass
class Report:
    source: AdapterSource
    model: str
    results: list[PathResult]
    notes: list[str]

    def reference(self) -> PathResult:
        return next(r for r in self.results if (r.path, r.precision) == REFERENCE)

    def base(self) -> PathResult:
        return next(r for r in self.results if r.path == "base")

    def failures(self) -> list[str]:
        """Why the report fails: fp32 paths that disagree with the harness, an adapter that changed nothing."""
        reasons = []
        reference = self.reference()
        for result in self.results:
            if result.precision == "fp32" and result.path in MUST_AGREE and not result.skipped:
                agree = agreement(reference, result)
                if not agree.identical:
                    reasons.append(f"in fp32 the {result.path} path gives a different answer than the harness on "
                                   f"{len(agree.answers)} of {agree.items} items"
                                   + (f" ({agree.missing} items scored by only one)" if agree.missing else ""))
        if same_raw_outputs(reference, self.base()):
            reasons.append("the adapter's outputs equal the base model's on every item: it was not applied, "
                           "or it changes nothing a greedy decode can see")
        return reasons

    def rows(self) -> list[dict]:
        reference = self.reference()
        rows = []
        for result in self.results:
            row = {"path": result.path, "precision": result.precision, "items": len(result.samples),
                   "accuracy": result.accuracy(), "seconds": result.seconds, "skipped": result.skipped or ""}
            if not result.skipped and result is not reference:
                agree = agreement(reference, result)
                row.update({"flips_vs_harness_fp32": len(agree.flips), "flip_rate": agree.flip_rate,
                            "answers_differ": len(agree.answers), "items_unmatched": agree.missing})
            rows.append(row)
        return rows

    def markdown(self) -> str:
        reference = self.reference()
        failures = self.failures()
        lines = [f"# Evaluation paths: {self.source.name}", "",
                 f"- **adapter**: {self.source.folder}", f"- **base model**: {self.model}",
                 f"- **items**: {len(reference.samples)} ({', '.join(sorted({t for t, _ in reference.samples}))})",
                 f"- **verdict**: {'FAILED: ' + '; '.join(failures) if failures else 'passed'}"
                 + ("" if failures else " (in fp32 the merged and lm-eval paths give the harness's answer on every "
                                       "item, and the adapter changes the base model's outputs)"),
                 "", "Every path is compared item by item with the harness in fp32 (the reference). *flips*: items "
                 "whose correctness differs; *answers differ*: items whose extracted answer differs.", "",
                 "| path | precision | accuracy % | flips | flip rate % | answers differ | seconds |",
                 "|---|---|---:|---:|---:|---:|---:|"]
        for row in self.rows():
            if row["skipped"]:
                lines.append(f"| {row['path']} | {row['precision']} | skipped: {row['skipped']} | | | | |")
                continue
            is_ref = "flips_vs_harness_fp32" not in row
            name = "base model (no adapter)" if row["path"] == "base" else row["path"] + (" (reference)" if is_ref else "")
            lines.append(f"| {name} | {row['precision']} | "
                         f"{100 * row['accuracy']:.1f} | {'–' if is_ref else row['flips_vs_harness_fp32']} | "
                         f"{'–' if is_ref else format(100 * row['flip_rate'], '.1f')} | "
                         f"{'–' if is_ref else row['answers_differ']} | {row['seconds']:.0f} |")
        for result in self.results:
            if result.skipped or result is reference or result.path == "base":
                continue
            agree = agreement(reference, result)
            if agree.answers:
                lines += ["", f"## {result.path}, {result.precision}: items that differ "
                              f"(the first {min(EXAMPLES, len(agree.answers))} of {len(agree.answers)})", "",
                          "| task | doc | target | harness fp32 | this path |", "|---|---:|---|---|---|"]
                for task, doc in agree.answers[:EXAMPLES]:
                    ref, mine = reference.samples[(task, doc)], result.samples[(task, doc)]
                    lines.append(f"| {task} | {doc} | {_cell(ref.target)} | {_cell(ref.response)} "
                                 f"({'right' if ref.correct else 'wrong'}) | {_cell(mine.response)} "
                                 f"({'right' if mine.correct else 'wrong'}) |")
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def write(self, output_dir: Path) -> list[Path]:
        output_dir.mkdir(parents=True, exist_ok=True)
        written = [write_text_atomic(output_dir / "equivalence.md", self.markdown())]
        rows = self.rows()
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with atomic_path(output_dir / "equivalence.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
        written.append(output_dir / "equivalence.csv")
        with atomic_path(output_dir / "items.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "precision", "task", "doc_id", "target", "response", "correct"])
            for result in self.results:
                for (task, doc), s in sorted(result.samples.items()):
                    writer.writerow([result.path, result.precision, task, doc, s.target, s.response, s.correct])
        written.append(output_dir / "items.csv")
        return written


def _cell(text: str) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return f"`{text[:40]}`" if text else "(empty)"


# ----------------------------------------------------------------------------------------------------------
# The command


DESCRIPTION = __doc__.split("\n\n", 1)[1].replace("``", "")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m harness.equivalence", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", metavar="ADAPTER",
                        help="an adapter folder (results/<run>/adapters/<label>, or a plain LoRA), or a results "
                             "folder with --label")
    parser.add_argument("--label", default=None, help="with a results folder: which adapter (lora-seed0)")
    parser.add_argument("--model", default=None, help="the base model (default: the adapter's run's)")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks or groups (default: the run's)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=int, default=None, help="the first N items of each task (default: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: 16 on CPU)")
    parser.add_argument("--prompt-format", default=None, choices=PROMPT_FORMATS,
                        help="the training's (default: the run's, else alpaca)")
    parser.add_argument("--precisions", default="auto",
                        help="fp32, bf16 or both (fp32,bf16); auto: fp32, and bf16 where the hardware runs it fast")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"which paths to run besides the harness's (default: all of {', '.join(PATHS)})")
    parser.add_argument("--output-dir", default=None, help="default: results/equivalence/<adapter name>")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own warnings and logs")
    return parser.parse_args(argv)


def _precisions(text: str) -> tuple[list[str], list[str]]:
    if text == "auto":
        if bf16_is_fast("cuda" if _cuda() else "cpu"):
            return ["fp32", "bf16"], []
        return ["fp32"], ["bf16 was not run: this machine has no fast bf16; --precisions fp32,bf16 runs it "
                          "emulated (slowly)"]
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in chosen if p not in PRECISION_DTYPES]
    if bad or not chosen:
        raise UserError(f"--precisions: {', '.join(bad) or 'nothing given'} (use fp32, bf16, fp32,bf16 or auto)")
    if "fp32" not in chosen:
        raise UserError("--precisions must include fp32: every path is compared with the harness in fp32")
    return list(dict.fromkeys(chosen)), []


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet.configure(verbose=args.verbose)
    if not quiet.is_verbose():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-saving bars of the base model and the export
    quiet.offline_environment()
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be a positive number of items")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise UserError(f"--paths: unknown path {', '.join(unknown)} (known: {', '.join(PATHS)})")
    precisions, notes = _precisions(args.precisions)
    source = locate_adapter(args.adapter, args.label)
    run = source.run_config
    model_name = args.model or source.model()
    if not model_name:
        raise UserError(f"the adapter at {source.folder} does not name its base model: pass --model")

    spec = read_adapter_folder(source.folder).spec
    if spec and parse_spec(spec).bias:
        raise UserError("an adapter trained with bias=true has no plain-LoRA form: only the harness path can "
                        "score it, so there is nothing to compare")
    tasks = [t.strip() for t in (args.tasks or ",".join(run.get("tasks") or DEFAULT_TASKS)).split(",") if t.strip()]
    data_dir = args.data_dir or run.get("data_dir")
    options = {"tasks": tasks, "data_dir": data_dir, "data_dir_resolved": str(resolve_data_dir(data_dir)),
               "limit": args.limit, "batch_size": args.batch_size,
               "prompt_format": args.prompt_format or run.get("prompt_format") or "alpaca"}
    options["suite"] = TaskSuite(tasks, data_dir, options["prompt_format"])  # one lm-eval TaskManager for every path
    options["suite"].checksums()  # unknown tasks, bad files: one line, now
    output_dir = Path(args.output_dir) if args.output_dir else Path("results") / "equivalence" / source.name

    steps = (1 + len(precisions) * (1 + len(set(paths) - {"harness"})))
    done = []

    def progress(which: str, precision: str) -> None:
        done.append(which)
        print(f"[{len(done)}/{steps}] {which}, {precision} ...", file=sys.stderr, flush=True)

    results: list[PathResult] = []
    work = Path(tempfile.mkdtemp(prefix="equivalence-"))
    try:
        base = export = None
        for precision in precisions:
            scored, saved = _in_process(source, model_name, precision, options, work, progress, "merged" in paths)
            results += scored
            base, export = saved or base, (work / "export") if saved else export
        for which in ("lm-eval", "vllm"):
            if which in paths:
                results += [_lm_eval_path(which, base, export, p, options, work, progress) for p in precisions]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = Report(source, model_name, results, notes)
    written = report.write(output_dir)
    print(report.markdown())
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
