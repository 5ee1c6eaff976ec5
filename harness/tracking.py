"""MLflow tracking: one parent run per invocation, one nested run per method and seed.

A thin layer over ``mlflow.MlflowClient`` (explicit run ids, no global "active run"),
so the run loop reads as::

    uri = check_tracking_uri(cfg.tracking_uri)          # fails fast, before any training
    tracker = Tracker(uri, cfg.experiment)
    with tracker.run(run_name, tags={"kind": "benchmark"}) as parent:
        parent.log_params(run_params(config_to_dict(cfg), data_checksums))
        with tracker.run(f"lora-seed0", parent=parent) as child:
            steps = child.step_logger()
            train(..., on_step=lambda s, loss, lr: steps.log(s, train_loss=loss, lr=lr))
            steps.flush()
            child.log_metrics(eval_metrics)
            child.log_artifacts(adapter_dir, "adapter")

A run that leaves its ``with`` block normally ends FINISHED; one left by an exception
ends FAILED (the exception propagates, so the loop can go on with the next method);
one left by Ctrl-C (``KeyboardInterrupt``), SIGTERM or ``SystemExit`` ends KILLED, with
the signal named in its ``error`` tag.

A process killed outright (``kill -9``, the out-of-memory killer, a power cut) cannot end
its runs: they would stay RUNNING forever. Every run therefore carries the host and pid of
the process that opened it (tags ``harness.host``, ``harness.pid``, ``harness.pid_start``),
and :meth:`Tracker.reconcile` (called when a run or a study starts) marks the runs of the
experiment left RUNNING by a process of this host that no longer exists KILLED, with a
note saying so. Runs opened on other hosts are left alone: their processes cannot be seen.

The default store is ``sqlite:///mlflow.db`` in the working directory, with artifacts
in ``mlruns/`` beside it. Creating MLflow's SQLite schema from several processes at
once fails ("duplicate column name"), so the creation holds an exclusive lock on a file
beside the database (``mlflow.db.lock``): a second process waits, then finds the schema.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import math
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from harness.errors import UserError, disk_full, interruption, quote

DEFAULT_TRACKING_DB = "mlflow.db"
# MLflow's limits (mlflow.utils.validation): a param value is at most 6000 characters, a key at most
# 250; a log_batch call takes at most 100 params and 1000 metrics.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
LIBRARIES = ("torch", "transformers", "peft", "lm_eval", "mlflow", "optuna", "datasets")
_DISTRIBUTIONS = {"lm_eval": "lm-eval"}  # import name -> distribution name where they differ


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def _mlflow():
    """Import mlflow lazily with telemetry off (importing this module must not touch the network)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


# ----------------------------------------------------------------------------------------------------------
# The store


def resolve_tracking_uri(uri: str | None) -> str:
    """``None`` -> ``sqlite:///<cwd>/mlflow.db`` (absolute, so a later chdir does not move the store)."""
    if uri is None or not str(uri).strip():
        return "sqlite:///" + str(Path.cwd().resolve() / DEFAULT_TRACKING_DB)
    return str(uri).strip()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (None for ``:memory:`` or a non-sqlite URI)."""
    if not uri.startswith("sqlite:"):
        return None
    path = urllib.parse.urlparse(uri).path
    # sqlite:///relative.db -> path "/relative.db"; sqlite:////abs.db -> "//abs.db" (SQLAlchemy's convention).
    path = path[1:] if path.startswith("/") else path
    if path in ("", ":memory:"):
        return None
    return Path(path)


def check_separate_stores(storage_url: str, tracking_uri: str | None) -> None:
    """Refuse an Optuna storage and an MLflow store in the same file: each creates its own schema and
    migrations in it, and neither can read the other's tables (see the design notes)."""
    tracking_db = sqlite_path(resolve_tracking_uri(tracking_uri))
    storage_file = sqlite_path(storage_url)
    if storage_file is None and storage_url.startswith("journal:"):
        storage_file = Path(storage_url[len("journal:"):].removeprefix("//"))
    if tracking_db is not None and storage_file is not None and tracking_db.resolve() == storage_file.resolve():
        raise UserError(f"--storage and --tracking-uri name the same file {str(tracking_db.resolve())!r}: the "
                        "Optuna storage and the MLflow store cannot share a file; use two files (e.g. "
                        "--storage sqlite:///optuna.db --tracking-uri sqlite:///mlflow.db)")


NETWORK_TIMEOUT_ENV = "HARNESS_NETWORK_TIMEOUT"  # seconds; for the checks of a tracking server or a database
DEFAULT_NETWORK_TIMEOUT_S = 5.0
MAX_NETWORK_TIMEOUT_S = 600.0


def network_timeout_s() -> float:
    """How long the up-front checks wait for a tracking server or a PostgreSQL storage to answer, in seconds.

    ``$HARNESS_NETWORK_TIMEOUT`` (default 5): a dead endpoint should cost seconds before any work, not
    MLflow's or the driver's minutes of retries; a slow remote server may need more.
    """
    raw = os.environ.get(NETWORK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_NETWORK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_NETWORK_TIMEOUT_S):
        raise UserError(f"{NETWORK_TIMEOUT_ENV}={quote(raw)} is not a timeout: give seconds, a number above 0 "
                        f"and at most {MAX_NETWORK_TIMEOUT_S:.0f} (default {DEFAULT_NETWORK_TIMEOUT_S:.0f})")
    return value


def check_tracking_uri(uri: str | None, timeout_s: float | None = None) -> str:
    """Resolve ``uri`` and make sure the store answers, or raise a one-line :class:`UserError`.

    Call it before any training: a typo in ``--tracking-uri`` should cost seconds, not a run.
    For a SQLite store this also creates the schema (once, here, not from several workers).
    Returns the resolved URI.
    """
    uri = resolve_tracking_uri(uri)
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_http(uri, network_timeout_s() if timeout_s is None else timeout_s)
    db = sqlite_path(uri)
    if db is not None:
        folder = db.parent.resolve() if str(db.parent) else Path.cwd()
        if not folder.is_dir():
            raise UserError(f"tracking store {uri!r}: folder {str(folder)!r} does not exist; create it or pass "
                            "another --tracking-uri")
        if not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise UserError(f"tracking store {uri!r} is not writable; pass another --tracking-uri")
    if scheme in ("", "file") and db is None:
        raise UserError(f"tracking URI {uri!r}: use sqlite:///path/mlflow.db or http://host:port "
                        "(MLflow's file store is deprecated)")
    try:
        with schema_lock(uri):
            _mlflow().MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # MLflow raises many types here; the user needs one line either way.
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"tracking store {quote(uri)} is unreachable: {first_line}") from err
    return uri


@contextmanager
def schema_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store while MLflow may create its schema (see the module docstring).

    ``flock`` is released by the kernel when the process dies, so a killed creator blocks nobody.
    Other stores (a server, PostgreSQL) serialise the creation themselves: no lock.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_http(uri: str, timeout_s: float) -> None:
    """Ping an MLflow server's /health quickly (MLflow's own client retries for minutes)."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (user-given URI)
            if response.status >= 400:
                raise UserError(f"tracking server {uri!r} answered HTTP {response.status}; is it an MLflow server?")
    except urllib.error.HTTPError as err:
        raise UserError(f"tracking server {uri!r} answered HTTP {err.code}; is it an MLflow server?") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"tracking server {uri!r} is unreachable ({reason}, waited {timeout_s:g} s); start it "
                        f"(mlflow server --port PORT), pass another --tracking-uri or set {NETWORK_TIMEOUT_ENV} "
                        "(seconds) for a slow server") from err


# ----------------------------------------------------------------------------------------------------------
# Names and values


_BAD_NAME_CHARS = re.compile(r"[^\w.\- /]")


def sanitize_name(name: str) -> str:
    """A metric or param key MLflow accepts: ``acc,none`` -> ``acc_none``, ``a:b`` -> ``a_b``.

    MLflow allows letters, digits, ``_ - . /`` and spaces (colons only off Windows, so they go
    too); the key must also be a normalised relative path (no ``//``, no leading ``/``, no ``..``).
    """
    clean = _BAD_NAME_CHARS.sub("_", str(name))
    clean = re.sub(r"/+", "/", clean).strip("/ ")
    clean = "/".join("_" if part in (".", "..") else part for part in clean.split("/"))
    return (clean or "_")[:MAX_KEY_LENGTH]


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into ``a.b`` keys with string values MLflow accepts.

    Lists become comma-separated strings (a method spec keeps its own commas, joined with ``;``
    so it stays readable), ``None`` becomes ``"None"``, and values longer than MLflow's limit
    are cut with a marker saying so.
    """
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        if isinstance(value, (list, tuple)):
            sep = ";" if any("," in str(v) for v in value) else ","
            text = sep.join(str(v) for v in value)
        else:
            text = str(value)
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            marker = f"...[{len(text)} chars, cut]"
            text = text[: MAX_PARAM_VALUE_LENGTH - len(marker)] + marker
        flat[sanitize_name(name)] = text
    return flat


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a result depends on (``"not installed"`` if absent)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(_DISTRIBUTIONS.get(name, name))
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


# CPU features that change which GEMM kernels torch's CPU backend picks (and so the last bits of a bf16 run)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def machine() -> dict[str, Any]:
    """The hardware a result was computed on: CPU model (with its family, model and stepping numbers, which a
    hypervisor's generic name such as "AMD EPYC" hides), its cache size, the CPU features that select torch's
    kernels and the kernel level torch chose from them, cores and torch's threads, and the CUDA device if one is
    used. Two runs of one seed repeat bit for bit only on the same kernels, so a repeat that differs can be traced
    to the machine (or ruled out) from this record."""
    cpu, flags, ids = "unknown", set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and cpu == "unknown":
                cpu = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key in _CPU_IDS and _CPU_IDS[key] not in ids:
                ids[_CPU_IDS[key]] = value.strip()
    except OSError:
        import platform

        cpu = platform.processor() or platform.machine() or "unknown"
    found: dict[str, Any] = {"cpu": cpu, **ids, "cpu_flags": [f for f in CPU_FLAGS if f in flags],
                             "cores": os.cpu_count()}
    try:
        import torch

        found["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        found["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            found["cuda_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return found


def machine_label(found: Mapping[str, Any] | None) -> str | None:
    """One line for a :func:`machine` record (a table's cell): "AMD EPYC (family 25 model 17 stepping 1, 1024 KB
    cache), AVX512 kernels, 2 cores, 2 threads", the parts it has; None for none."""
    if not found:
        return None
    ids = " ".join(f"{word} {found[key]}" for word, key in (("family", "cpu_family"), ("model", "cpu_model"),
                                                            ("stepping", "cpu_stepping")) if key in found)
    detail = ", ".join(x for x in (ids, f"{found['cpu_cache']} cache" if "cpu_cache" in found else "") if x)
    parts = [str(found.get("cpu", "unknown")) + (f" ({detail})" if detail else "")]
    if "cuda_device" in found:
        parts.append(str(found["cuda_device"]))
    if "torch_cpu_capability" in found:
        parts.append(f"{found['torch_cpu_capability']} kernels")
    elif found.get("cpu_flags"):
        parts.append("+".join(found["cpu_flags"]))
    parts += [f"{found[k]} {w}" for k, w in (("cores", "cores"), ("torch_threads", "threads")) if k in found]
    return ", ".join(parts)


# /proc/cpuinfo's keys that tell one CPU generation from another under a generic model name
_CPU_IDS = {"cpu family": "cpu_family", "model": "cpu_model", "stepping": "cpu_stepping", "cache size": "cpu_cache"}
# What does not change what runs: a study writes its journal and reports into results/ while it runs
_NOT_CODE = (":(top,exclude)results", ":(top,exclude,glob)**/*.md")


def git_commit(folder: str | os.PathLike | None = None) -> str | None:
    """The current commit of the repository holding ``folder`` (default: this package), ``+dirty`` if a tracked
    file that can change a result is modified (results/ and Markdown files do not count)."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", *_NOT_CODE],
                               cwd=folder, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit or None


@functools.cache
def loaded_commit() -> str | None:
    """The commit of the code this process runs, read once at the first call: a long-lived process (a study's
    worker) calls it when it starts, so a commit made while it runs does not relabel the code it had loaded."""
    return git_commit()


def run_params(config: Mapping[str, Any], data_checksums: Mapping[str, str] | None = None) -> dict[str, str]:
    """The params of a parent run: the resolved config, library versions, git commit and data checksums."""
    params: dict[str, Any] = dict(config)
    params["versions"] = library_versions()
    params["machine"] = machine()
    params["git_commit"] = loaded_commit() or "unknown"
    if data_checksums:
        params["data_checksum"] = dict(data_checksums)
    return flatten_params(params)


# ----------------------------------------------------------------------------------------------------------
# Runs


@dataclass
class RunHandle:
    """One MLflow run: log params, metrics and artifacts to it by id."""

    client: Any
    run_id: str
    name: str
    _status: str | None = field(default=None, repr=False)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (flattened and cut to MLflow's limits), 100 per request."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log several metrics at one step in one request; names are sanitised, non-numbers skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(sanitize_name(k), float(v), now, step) for k, v in metrics.items() if _is_number(v)]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start:start + MAX_METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values cut to MLflow's tag limit)."""
        from mlflow.entities import RunTag

        items = [RunTag(sanitize_name(k), str(v)[:5000]) for k, v in tags.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[start:start + MAX_PARAMS_PER_BATCH])

    def step_logger(self, flush_every: int = 500, flush_seconds: float = 15.0) -> "StepMetricLogger":
        """A buffered per-step logger for training curves (see :class:`StepMetricLogger`)."""
        return StepMetricLogger(self.client, self.run_id, flush_every=flush_every, flush_seconds=flush_seconds)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy one file into the run's artifacts (under ``artifact_path`` if given)."""
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a folder's contents into the run's artifacts (under ``artifact_path`` if given)."""
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def fail(self, message: str) -> None:
        """Mark the run FAILED with a reason (e.g. a NaN loss) when the caller handles the error itself."""
        self.set_tags({"error": message})
        self._status = "FAILED"


def log_evaluation(handle: RunHandle, evaluation: Any, samples_path: str | os.PathLike) -> None:
    """An evaluation (:class:`harness.evaluate.EvalResult`) in a run: task metrics, the average over the
    evaluated tasks (``average_accuracy``), and lm-eval's per-item samples written to ``samples_path``
    (JSON lines) and logged as an artifact."""
    metrics = evaluation.flat_metrics()
    leaf = evaluation.leaf_scores()
    if leaf:
        metrics["average_accuracy"] = sum(leaf.values()) / len(leaf)
    handle.log_metrics(metrics)
    handle.log_artifact(evaluation.write_samples(samples_path), "samples")


def log_summary(handle: RunHandle, summary_csv: str | os.PathLike) -> None:
    """Put a run's per-method summary on its parent run, so the MLflow UI compares methods without expanding runs.

    Metrics ``average/<label>``, ``gain_vs_lora/<label>`` (and the interval bounds) show in the
    experiment's chart view and runs table at parent level, one chart section per quantity with a chart per
    method, so separately launched runs compare side by side; ``summary_table.json`` is the same table
    as an MLflow table artifact (the UI renders it, ``mlflow.load_table`` reads it back).
    """
    import pandas as pd

    table = pd.read_csv(summary_csv)
    metrics = {}
    for _, row in table.iterrows():
        for column in ("average", "gain_vs_base", "gain_vs_lora", "gain_vs_lora_low", "gain_vs_lora_high",
                       "trainable_params"):
            if column in row and pd.notna(row[column]):
                metrics[f"{column}/{row['method']}"] = float(row[column])
    handle.log_metrics(metrics)
    handle.client.log_table(handle.run_id, data=table, artifact_file="summary_table.json")


def _is_number(value: Any) -> bool:
    """True for ints, floats and numeric scalars such as numpy's (not for strings or None)."""
    if isinstance(value, (str, bytes)) or value is None:
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class Tracker:
    """An experiment in one tracking store; opens parent and nested runs as context managers."""

    def __init__(self, tracking_uri: str | None, experiment: str) -> None:
        mlflow = _mlflow()
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        with schema_lock(self.tracking_uri):  # the first access of a new store creates its schema
            self.experiment_id = self._experiment_id(experiment)

    def _experiment_id(self, name: str) -> str:
        """Get or create the experiment; a SQLite store keeps artifacts in ``mlruns/`` beside the database."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        db = sqlite_path(self.tracking_uri)
        # MLflow's default artifact root for a SQLite store is ./mlruns of whatever the cwd is; tie it to the db.
        location = (db.resolve().parent / "mlruns").as_uri() if db is not None else None
        try:
            # The tag makes MLflow 3's UI open the experiment on its training runs, not its GenAI overview.
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
        except MlflowException:
            found = self.client.get_experiment_by_name(name)  # another process created it meanwhile
            if found is None:
                raise
            return found.experiment_id

    @contextmanager
    def run(self, name: str, parent: RunHandle | None = None,
            tags: Mapping[str, Any] | None = None) -> Iterator[RunHandle]:
        """Open a run (nested under ``parent`` if given) and end it FINISHED, FAILED or KILLED.

        An exception marks the run FAILED, with its message in the ``error`` tag, and propagates;
        ``KeyboardInterrupt`` and ``SystemExit`` mark it KILLED and propagate.
        """
        all_tags = {"mlflow.runName": name, **owner_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id
        created = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        handle = RunHandle(self.client, created.info.run_id, name)
        try:
            yield handle
        except Exception as err:
            if disk_full(err):  # the store may be on the full disk itself: try quietly, the next run reconciles
                with _mlflow_quiet(), contextlib.suppress(Exception):
                    handle.set_tags({"error": "the disk is full"})
                    handle.client.set_terminated(handle.run_id, status="FAILED")
                raise
            _end(handle, "FAILED", f"{type(err).__name__}: {err}")
            raise
        except BaseException as err:  # KeyboardInterrupt, SIGTERM, SystemExit: the user stopped it
            _end(handle, "KILLED", interruption(err) if isinstance(err, KeyboardInterrupt) else "exited")
            raise
        else:
            _end(handle, handle._status or "FINISHED", None)

    def has_run(self, run_id: str | None) -> bool:
        """Whether this store holds the run (a study's journal may have travelled from another MLflow store)."""
        from mlflow.exceptions import MlflowException

        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def names_in_use(self, name: str) -> set[str]:
        """The names of this experiment's benchmark runs that start with ``name`` (finished or not)."""
        if "'" in name or "\\" in name:  # not expressible in MLflow's filter syntax; the folders still decide
            return set()
        runs = self.client.search_runs([self.experiment_id], max_results=10_000,
                                       filter_string=f"attributes.run_name LIKE '{name}%' and tags.kind = 'benchmark'")
        return {r.info.run_name for r in runs}

    def reconcile(self, log=print) -> list[str]:
        """Mark KILLED the runs of this experiment left RUNNING by a process of this host that no longer exists.

        Returns their ids. See the module docstring; runs of other hosts and of live processes are untouched.
        """
        from mlflow.entities import RunTag

        host = socket.gethostname()
        runs = self.client.search_runs([self.experiment_id], max_results=10_000,
                                       filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'")
        ended = []
        for found in runs:
            tags = found.data.tags
            if process_alive(tags.get(PID_TAG), tags.get(PID_START_TAG)):
                continue
            note = (f"its process (pid {tags.get(PID_TAG)} on {host}) ended without closing the run (killed?); "
                    f"marked KILLED by pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
            self.client.log_batch(found.info.run_id, tags=[RunTag("error", note), RunTag("mlflow.note.content", note)])
            self.client.set_terminated(found.info.run_id, status="KILLED")
            ended.append(found.info.run_id)
        if ended:
            log(f"MLflow: {len(ended)} run(s) of experiment {self.experiment_id} left RUNNING by a killed process "
                "marked KILLED")
        return ended


HOST_TAG, PID_TAG, PID_START_TAG = "harness.host", "harness.pid", "harness.pid_start"


class NoTracking:
    """A tracker that records nothing, for the ranks other than 0 of a torchrun job (rank 0 tracks the job).

    Its runs take every call a :class:`RunHandle` takes and do nothing; exceptions pass through.
    """

    @contextmanager
    def run(self, name: str, parent: Any = None, tags: Mapping[str, Any] | None = None) -> Iterator["_NoRun"]:
        yield _NoRun(name)


@dataclass
class _NoRun:
    name: str
    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    @contextmanager
    def step_logger(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        yield _NoSteps()

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, folder: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def fail(self, message: str) -> None:
        pass


class _NoSteps:
    def log(self, step: int, **metrics: float) -> None:
        pass


def owner_tags() -> dict[str, str]:
    """The tags that say which process opened a run (see :meth:`Tracker.reconcile`)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: process_start(os.getpid()) or ""}


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of ``/proc/PID/stat`` (Linux), or None; the name in parentheses may hold spaces."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, so a reused pid is not taken for the owner."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None  # field 22 of stat


def process_alive(pid: str | int | None, start: str | None = None) -> bool:
    """Whether the process ``pid`` of this host still exists (and, if ``start`` is known, is the same one)."""
    try:
        pid = int(pid)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True  # no owner recorded: nothing can be said, leave the run alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, under another user
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc: the pid exists, trust it
    return fields[0] != "Z" and (not start or fields[19] == start)  # a zombie has ended already


@contextmanager
def _mlflow_quiet() -> Iterator[None]:
    """MLflow's own ERROR logs (a whole SQL statement and traceback) off, for an error the caller reports in one line."""
    was = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # the logger is mlflow.store.db.utils, among others
    try:
        yield
    finally:
        logging.disable(was)


def _end(handle: RunHandle, status: str, error: str | None) -> None:
    """Set the final status; a store error here must not hide the run's own exception."""
    try:
        if error is not None:
            handle.set_tags({"error": (error.splitlines() or [""])[0]})
        handle.client.set_terminated(handle.run_id, status=status)
    except Exception as err:  # best effort while already failing
        if error is None:
            raise
        print(f"warning: could not mark MLflow run {handle.name!r} {status}: {err}")


# ----------------------------------------------------------------------------------------------------------
# Per-step metrics


class StepMetricLogger:
    """Buffer per-step metrics and write them with ``log_batch``.

    One ``log_metric`` costs ~8 ms on SQLite (1.6 s over 200 steps x 1 metric); ``log_batch`` writes
    1,000 points in ~0.4 s. The buffer is flushed every ``flush_every`` points or ``flush_seconds``,
    and on :meth:`flush` / :meth:`close` (call them in a ``finally`` so a failing run keeps its curve).
    """

    def __init__(self, client: Any, run_id: str, flush_every: int = 500, flush_seconds: float = 15.0) -> None:
        self.client = client
        self.run_id = run_id
        self.flush_every = min(flush_every, MAX_METRICS_PER_BATCH)
        self.flush_seconds = flush_seconds
        self._buffer: list[Any] = []
        self._last_flush = time.monotonic()

    def log(self, step: int, **metrics: float) -> None:
        """Record ``name=value`` pairs at ``step`` (NaN and inf are kept: they show a diverging run)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for name, value in metrics.items():
            self._buffer.append(Metric(sanitize_name(name), float(value), now, int(step)))
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write everything buffered."""
        while self._buffer:
            chunk, self._buffer = self._buffer[:MAX_METRICS_PER_BATCH], self._buffer[MAX_METRICS_PER_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush; the logger may still be used afterwards."""
        self.flush()

    def __enter__(self) -> "StepMetricLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

