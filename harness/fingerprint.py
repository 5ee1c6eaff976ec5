"""The protocol fingerprint: everything that decides whether two runs can be compared, except the method.

Small protocol differences decide "who wins" in this field (toggling only the loss on the prompt
explained a published variant's gain), so two runs launched separately are comparable only when
they trained and scored the same way. :func:`protocol_fingerprint` gathers the parts that must
agree, in readable form where they are short and as SHA-256 checksums where they are not:

- the base model (its name, its architecture as transformers' ``model_type`` and a checksum of its
  weights), the tokenizer and its chat template;
- the training data (checksum), the loss masking (``train_on_inputs``), the cutoff length, the
  steps or epochs, the effective batch, the schedule (warm-up, weight decay, clipping), the
  precision and the prompt format;
- what was scored and how: the tasks, the split, the item limit, the task YAML files (with
  their includes and ``harness/tasks/utils.py``, which holds the answer filters), the decoding (beams,
  each task's ``generation_kwargs``: max tokens and stop strings), the answer filters, and a
  checksum of each evaluated data set;
- the versions of the libraries that train and score.

The method's own options (spec, rank, alpha, targets, learning rate) and the seeds are left out on
purpose: they are what a comparison varies. The fingerprint's ``hash`` is the first 12 hex digits
of the SHA-256 of the canonical JSON of its parts; :func:`differing_parts` names the parts in which
two fingerprints disagree.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from harness.fsutil import write_text_atomic
from harness.tracking import library_versions

HASH_LENGTH = 12
# Libraries whose version can change a score; the harness's own code is recorded as the git commit elsewhere.
PROTOCOL_LIBRARIES = ("torch", "transformers", "peft", "lm_eval")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def sha256_json(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value`` (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def short_hash(parts: Mapping[str, Any]) -> str:
    return sha256_json(parts)[:HASH_LENGTH]


# ----------------------------------------------------------------------------------------------------------
# The parts


def weights_checksum(model) -> str:
    """SHA-256 of the base model's weights.

    A model loaded from a folder is hashed from its weight files (cached by path, size and modification
    time, so the 0.5 GB embedded model is read once); a model built in memory (tiny-random) or loaded from
    the hub cache without a folder is hashed from its state dict, each tensor as float32 so that the
    checksum names the weights, not the precision they are held in.
    """
    folder = Path(str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""))
    files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES) if folder.is_dir() else []
    if files:
        return _files_checksum(files)
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _files_checksum(files: Sequence[Path]) -> str:
    from harness.models import cache_dir  # deferred: harness.models loads torch

    index_path = cache_dir() / "checksums.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    digest = hashlib.sha256()
    changed = False
    for path in files:
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in index:
            file_digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    file_digest.update(block)
            index[key] = file_digest.hexdigest()
            changed = True
        digest.update(path.name.encode())
        digest.update(index[key].encode())
    if changed:
        try:
            index_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(index_path, json.dumps(index, indent=1))
        except OSError:
            pass  # a read-only cache only costs the next run another read
    return digest.hexdigest()


def tokenizer_checksum(tokenizer) -> dict[str, str]:
    """Checksums of the vocabulary (with the special tokens and padding side) and of the chat template."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    specials = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", {}) or {}).items()}
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "tokenizer": sha256_json({"class": type(tokenizer).__name__, "vocab": vocab, "special": specials,
                                  "padding_side": getattr(tokenizer, "padding_side", None)}),
        "chat_template": hashlib.sha256(template.encode()).hexdigest() if template else "none",
    }


def task_protocol(tasks: Sequence[str], data_dir, prompt_format: str) -> dict[str, dict[str, Any]]:
    """Per evaluated leaf task: a checksum of its YAML files (and the task folder's Python), its decoding
    settings and its answer filters, as lm-eval will read them: :meth:`harness.evaluate.TaskSuite.protocol`
    on a suite of its own."""
    from harness.evaluate import TaskSuite  # deferred: harness.evaluate loads torch

    return TaskSuite(tasks, data_dir, prompt_format).protocol()


def protocol_fingerprint(cfg, *, model, tokenizer, train_checksum: str, eval_checksums: Mapping[str, str],
                         data_dir, world_size: int = 1, precision: str | None = None, suite=None) -> dict[str, Any]:
    """The fingerprint of a run: ``{"hash": ..., "parts": {...}}`` (see the module docstring).

    ``suite`` is the run's :class:`harness.evaluate.TaskSuite` (the tasks' protocol is read from it); without
    one, one is built from ``cfg.tasks``, ``data_dir`` and ``cfg.prompt_format``.
    """
    versions = library_versions()
    parts: dict[str, Any] = {
        "base_model": cfg.model,
        "architecture": getattr(getattr(model, "config", None), "model_type", None),
        "base_weights": weights_checksum(model),
        **tokenizer_checksum(tokenizer),
        "train_data": cfg.train_data,
        "train_data_sha256": train_checksum,
        "train_on_inputs": cfg.train_on_inputs,
        "cutoff_len": cfg.cutoff_len,
        "max_steps": cfg.max_steps,
        "epochs": cfg.epochs if cfg.max_steps is None else None,
        "effective_batch": cfg.batch_size * cfg.grad_accum * world_size,
        "schedule": {"scheduler": "linear", "warmup_ratio": cfg.warmup_ratio, "weight_decay": cfg.weight_decay,
                     "max_grad_norm": cfg.max_grad_norm, "optimizer": "adamw"},
        "precision": precision or getattr(cfg, "precision", "fp32"),
        "prompt_format": cfg.prompt_format,
        "tasks": list(cfg.tasks),
        "split": getattr(cfg, "split", "test"),
        "limit": cfg.limit,
        "num_beams": cfg.num_beams,
        "task_protocol": suite.protocol() if suite is not None else task_protocol(cfg.tasks, data_dir, cfg.prompt_format),
        "eval_data_sha256": dict(sorted(eval_checksums.items())),
        "versions": {name: versions.get(name, "unknown") for name in PROTOCOL_LIBRARIES},
    }
    return {"hash": short_hash(parts), "parts": parts}


def differing_parts(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Names of the parts in which two fingerprints (or their ``parts`` mappings) disagree, sorted."""
    pa, pb = a.get("parts", a), b.get("parts", b)
    return sorted(k for k in set(pa) | set(pb) if sha256_json(pa.get(k)) != sha256_json(pb.get(k)))


def describe(fingerprint: Mapping[str, Any]) -> list[str]:
    """Readable lines for summary.md: short parts as they are, checksums shortened."""
    lines = []
    for key, value in fingerprint["parts"].items():
        if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
            value = value[:HASH_LENGTH]
        elif key == "task_protocol":
            value = ", ".join(f"{t} (yaml {v['yaml_sha256'][:8]})" for t, v in value.items())
        elif key == "eval_data_sha256":
            value = ", ".join(f"{t} {v[:8]}" for t, v in value.items())
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        lines.append(f"{key}: {value}")
    return lines
