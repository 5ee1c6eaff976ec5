"""``result.json``: one machine-readable file per results folder, enough to compare runs launched apart.

It follows the convention of peft's method_comparison suite (one JSON file per experiment with the
run's metadata, configuration and metrics) and adds what a paired comparison needs:

```
{"format": 1, "run_name": ..., "created": ISO time,
 "git": {"commit": sha, "dirty": bool}, "versions": {library: version},
 "config": the resolved RunConfig, "fingerprint": {"hash": ..., "parts": {...}},
 "systems": [{"label", "method", "seed", "ok", "error", "scores", "average", "trainable_params",
              "timings": {...}, "correct": {task: {doc_id: 0/1}}, ...every other SystemResult field}]}
```

``systems`` holds the base model's row (``method`` "base") and one entry per method and seed; the
per-item verdicts (``correct``) are what lets :mod:`harness.compare` pair two runs' methods on the
same test items. :func:`read_result` turns the file back into :class:`~harness.report.SystemResult`
objects, ignoring fields it does not know (files written by a newer harness still load).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from harness.errors import UserError
from harness.fsutil import write_text_atomic
from harness.tracking import library_versions, loaded_commit, machine

RESULT_FILE = "result.json"
FORMAT = 1


def _git() -> dict[str, Any]:
    commit = loaded_commit()  # the code this process loaded, not a commit made since
    if commit is None:
        return {"commit": None, "dirty": None}
    return {"commit": commit.removesuffix("+dirty"), "dirty": commit.endswith("+dirty")}


def _system(result) -> dict[str, Any]:
    """One entry of ``systems``: every :class:`~harness.report.SystemResult` field of ``result`` (a SystemResult,
    or a :class:`harness.run.MethodResult`, which reads the same attributes from its training and evaluation)."""
    from harness.report import SystemResult  # deferred: harness.report loads numpy and scipy

    entry = {f.name: getattr(result, f.name) for f in dataclasses.fields(SystemResult)}
    entry["contaminated"] = sorted(entry["contaminated"] or ())  # a list in JSON (a set is not JSON)
    entry["label"] = result.method
    entry["ok"] = result.ok
    entry["correct"] = {task: {str(doc): value for doc, value in items.items()}
                        for task, items in (result.correct or {}).items()}
    scores = list((result.scores or {}).values())
    entry["average"] = sum(scores) / len(scores) if scores else None
    return entry


def build_result(run_name: str, config: Mapping[str, Any], fingerprint: Mapping[str, Any], base,
                 results: Sequence) -> dict[str, Any]:
    """The content of result.json for a finished run (``base`` may be None)."""
    return {
        "format": FORMAT,
        "run_name": run_name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": _git(),
        "versions": library_versions(),
        "machine": machine(),
        "config": dict(config),
        "fingerprint": dict(fingerprint),
        "systems": [_system(r) for r in ([base] if base is not None else []) + list(results)],
    }


def write_result_json(run_dir: str | Path, content: Mapping[str, Any]) -> Path:
    return write_text_atomic(Path(run_dir) / RESULT_FILE, json.dumps(content, indent=1, default=str) + "\n")


def load_result_json(path: str | Path, source: str | None = None) -> dict[str, Any]:
    """Read a result.json file (or a folder holding one); one-line UserError when it is not one."""
    path = Path(path)
    name = source or str(path)
    file = path / RESULT_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{name} is not a results folder: it has no {RESULT_FILE} "
                        "(give a folder written by python -m harness.run, or an MLflow run id)")
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{name}: {RESULT_FILE} is unreadable ({type(err).__name__})") from err
    if not isinstance(content, dict) or "systems" not in content or "fingerprint" not in content:
        raise UserError(f"{name}: {RESULT_FILE} has no systems or fingerprint: not written by harness.run")
    _check_shape(content, f"{name}: {RESULT_FILE} ({file})")
    return content


def _check_shape(content: Mapping[str, Any], where: str) -> None:
    """Refuse, in one line naming the file, a result.json whose fields have the wrong types.

    A hand-edited or damaged file (``"fingerprint": null``, a string where a mapping belongs, a field that
    is not a valid literal) would otherwise fail later in :mod:`harness.compare` with a traceback.
    """
    def bad(field: str, expected: str, value: Any) -> UserError:
        return UserError(f"{where} is damaged: {field} should be {expected}, not {type(value).__name__} "
                         "(write it again with python -m harness.run, or restore the original file)")

    fingerprint = content["fingerprint"]
    if not isinstance(fingerprint, dict):
        raise bad("fingerprint", "a mapping", fingerprint)
    if not isinstance(fingerprint.get("hash"), str):
        raise bad("fingerprint.hash", "a string", fingerprint.get("hash"))
    if not isinstance(fingerprint.get("parts", {}), dict):
        raise bad("fingerprint.parts", "a mapping", fingerprint.get("parts"))
    if not isinstance(content.get("config", {}), dict):
        raise bad("config", "a mapping", content.get("config"))
    if not isinstance(content.get("run_name", ""), (str, type(None))):
        raise bad("run_name", "a string", content.get("run_name"))
    systems = content["systems"]
    if not isinstance(systems, list):
        raise bad("systems", "a list", systems)
    for i, entry in enumerate(systems):
        if not isinstance(entry, dict):
            raise bad(f"systems[{i}]", "a mapping", entry)
        for field in ("scores", "correct", "timings"):
            if entry.get(field) is not None and not isinstance(entry[field], dict):
                raise bad(f"systems[{i}].{field}", "a mapping", entry[field])
        if not all(isinstance(v, dict) for v in (entry.get("correct") or {}).values()):
            raise bad(f"systems[{i}].correct", "a mapping of tasks to mappings", entry["correct"])
        if not all(v is None or isinstance(v, (int, float)) for v in (entry.get("scores") or {}).values()):
            raise bad(f"systems[{i}].scores", "a mapping of tasks to numbers", entry["scores"])
    try:
        systems_of(content)
    except (TypeError, ValueError, SyntaxError, AttributeError) as err:
        raise UserError(f"{where} is damaged: a systems entry does not load ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); write it again with python -m "
                        "harness.run, or restore the original file") from err


def systems_of(content: Mapping[str, Any]):
    """``(base, results)`` as :class:`~harness.report.SystemResult` objects from a result.json's content."""
    from harness.report import BASE, SystemResult  # deferred: harness.report loads numpy and scipy

    known = {f.name for f in dataclasses.fields(SystemResult)}
    base, results = None, []
    for entry in content.get("systems", []):
        values = {k: v for k, v in entry.items() if k in known}
        values["method"] = entry.get("label") or entry.get("method")
        values["loss_curve"] = [tuple(p) for p in values.get("loss_curve") or []]
        contaminated = values.get("contaminated") or ()
        if isinstance(contaminated, str):  # written before it was a list: the set's repr, "set()" or "{'task'}"
            contaminated = ast.literal_eval(contaminated)
        values["contaminated"] = set(contaminated)
        system = SystemResult(**values)
        if system.method == BASE:
            base = system
        else:
            results.append(system)
    return base, results
