"""``python -m harness.compare A B ...``: the paired results table across runs launched separately.

Each source is a results folder written by ``python -m harness.run`` (it holds ``result.json``) or
the id of such a run's MLflow parent run (its ``results/result.json`` artifact is read). The
runs' protocol fingerprints (:mod:`harness.fingerprint`) must agree: two runs that trained or
scored differently (another prompt, loss masking, decoding, answer parser, data, library
versions, another base model or architecture, ...) are not comparable, and the command refuses with
one line naming the parts that differ (and the runs' architectures or base models where those
differ), unless ``--allow-mismatch``; the table then flags every row whose protocol differs from
the first run's.

The table is :func:`harness.report.summarize`'s, the same as harness.run writes, built from the
per-item verdicts stored in each result.json, so methods are paired on the same test items and,
where their seeds match, on the same seeds. Labels that occur in several runs are prefixed with
their run's name (``run-a/lora``); the reference for "gain vs LoRA" is a run's own
(:func:`harness.adapters.spec.reference_name`): the first ``lora`` row, else the first LoRA of any kind.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Sequence

from harness.adapters.spec import reference_name
from harness.errors import UserError, cli_entry
from harness.fingerprint import differing_parts
from harness.fsutil import atomic_path, write_text_atomic
from harness.resultfile import RESULT_FILE, load_result_json, systems_of
from harness.tracking import _check_http, _mlflow, network_timeout_s, resolve_tracking_uri, sqlite_path


def load_source(source: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """A result.json's content from a results folder, a result.json path, or an MLflow run id."""
    path = Path(source)
    if path.exists():
        return load_result_json(path)
    if os.sep in source or source.startswith("."):
        raise UserError(f"{source} does not exist (give a results folder or an MLflow run id)")
    return _from_mlflow(source, tracking_uri)


def _from_mlflow(run_id: str, tracking_uri: str | None) -> dict[str, Any]:
    uri = resolve_tracking_uri(tracking_uri)
    if urllib.parse.urlparse(uri).scheme.lower() in ("http", "https"):
        _check_http(uri, network_timeout_s())  # harness.run's check: a dead server costs seconds, not MLflow's retries
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # reading must not create an empty store
        raise UserError(f"{run_id!r} is neither a folder nor a run: there is no MLflow store at {db} "
                        "(pass --tracking-uri)")
    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except Exception as err:  # MLflow raises its own exception types per store
        raise UserError(f"{run_id!r} is neither a folder nor a run in the MLflow store {uri} "
                        f"({type(err).__name__})") from err
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, f"results/{RESULT_FILE}", tmp)
        except Exception as err:
            raise UserError(f"MLflow run {run_id} has no results/{RESULT_FILE}: give the parent run of a "
                            "harness.run invocation") from err
        return load_result_json(Path(local), source=f"MLflow run {run_id}")


def compare(contents: Sequence[dict[str, Any]], allow_mismatch: bool = False):
    """``(table, tasks, notes)`` for several runs' result.json contents; see the module docstring."""
    from harness.report import summarize  # deferred: harness.report loads numpy and scipy

    if len(contents) < 2:
        raise UserError("give at least two runs to compare (results folders or MLflow run ids)")
    names = _run_names(contents)
    reference = contents[0]["fingerprint"]
    mismatches = {name: differing_parts(reference, c["fingerprint"]) for name, c in zip(names, contents)}
    differing = sorted({part for parts in mismatches.values() for part in parts})
    if differing and not allow_mismatch:
        detail = "; ".join(f"{name}: {', '.join(parts)}" for name, parts in mismatches.items() if parts)
        for part in ("architecture", "base_model"):  # the most common reason, spelled out with its values
            if part in differing:
                values = ", ".join(f"{name} {c['fingerprint'].get('parts', {}).get(part)}"
                                   for name, c in zip(names, contents))
                raise UserError(f"the runs are not comparable: they ran on different {part.replace('_', ' ')}s "
                                f"({values}); their protocols differ from {names[0]}'s in {', '.join(differing)}; "
                                "pass --allow-mismatch to compare anyway")
        raise UserError(f"the runs are not comparable: their protocols differ from {names[0]}'s in "
                        f"{', '.join(differing)} ({detail}); pass --allow-mismatch to compare anyway")

    per_run = [systems_of(c) for c in contents]
    counts: dict[str, int] = {}
    for _, results in per_run:
        for label in dict.fromkeys(r.method for r in results):
            counts[label] = counts.get(label, 0) + 1
    base = next((b for b, _ in per_run if b is not None), None)
    merged, flagged = [], []
    for name, (_, results), parts in zip(names, per_run, mismatches.values()):
        for r in results:
            label = r.method
            r.method = f"{name}/{label}" if counts[label] > 1 else label
            if parts:
                flagged.append(r.method)
            merged.append(r)
    # the run's own rule (harness.adapters.spec.reference_name) on the labels without their run prefix
    labels = list(dict.fromkeys(r.method for r in merged))
    bare = [label.rsplit("/", 1)[-1] for label in labels]
    chosen = reference_name(bare)
    reference = labels[bare.index(chosen)] if chosen is not None else None  # None: no row (a run name is no method)
    table = summarize(base, merged, reference=reference)
    table["protocol"] = [
        "differs: " + ", ".join(mismatches[_owner(m, names, per_run)]) if m in set(flagged) else "same"
        for m in table["method"]
    ]
    tasks = list(dict.fromkeys(t for b, rs in per_run for r in ([b] if b else []) + rs for t in r.scores))
    notes = [f"{name}: fingerprint {c['fingerprint']['hash']}" for name, c in zip(names, contents)]
    if differing:
        notes.append(f"WARNING: protocols differ in {', '.join(differing)}; rows marked 'differs' are not "
                     "comparable with the first run's")
    return table, tasks, notes


def _owner(label: str, names: Sequence[str], per_run) -> str:
    for name, (_, results) in zip(names, per_run):
        if any(r.method == label for r in results):
            return name
    return names[0]


def _run_names(contents: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for i, c in enumerate(contents):
        name = str(c.get("run_name") or f"run{i + 1}")
        while name in names:
            name = f"{name}-{i + 1}"
        names.append(name)
    return names


def markdown(table, tasks: Sequence[str], notes: Sequence[str]) -> str:
    from harness.report import summary_markdown  # deferred: harness.report loads numpy and scipy

    text = summary_markdown(table, tasks, {"runs": "; ".join(notes)}, title="Comparison")
    flagged = table[table["protocol"] != "same"]
    if len(flagged):
        text += "\n## Protocol mismatches\n\n" + "\n".join(
            f"- `{row['method']}`: {row['protocol']}" for _, row in flagged.iterrows()) + "\n"
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness.compare",
        description="Compare runs launched separately: the same paired table as harness.run writes, built "
                    "from each run's result.json. Runs whose protocol fingerprints differ are refused.")
    parser.add_argument("sources", nargs="+", metavar="RUN",
                        help="a results folder (results/<run name>) or the MLflow id of a harness.run parent run")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="compare runs whose protocols differ; the table flags the rows that differ")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow store to read run ids from (default: sqlite:///mlflow.db here)")
    parser.add_argument("--output", metavar="DIR",
                        help="also write comparison.md and comparison.csv into DIR")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    contents = [load_source(s, args.tracking_uri) for s in args.sources]
    table, tasks, notes = compare(contents, allow_mismatch=args.allow_mismatch)
    text = markdown(table, tasks, notes)
    if args.output:
        out = Path(args.output)
        if out.exists() and not out.is_dir():
            raise UserError(f"--output {args.output} is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "comparison.md", text)
        with atomic_path(out / "comparison.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.6g")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
