"""The Optuna storage a study lives in: an SQLite file, a journal file, or PostgreSQL (any SQLAlchemy URL).

``--storage`` takes:

- ``sqlite:///optuna.db`` (the default, in the working directory; a file of its own: Optuna and
  MLflow cannot share one SQLite file, both keep an alembic version table);
- ``journal:PATH`` (Optuna's JournalStorage in an append-only file, e.g. on a shared file system);
- ``postgresql+psycopg2://user:password@host:port/db`` (with SQLAlchemy 2.1 a bare
  ``postgresql://`` expects psycopg 3, which is not installed), or any other SQLAlchemy URL.

Workers open with ``create=False`` and never create anything. Several study commands may create
the same fresh storage at once: the schema is created by whichever gets there first, and the
others, whose "table ... already exists" is that race, open it again (:func:`open_storage`).

SQLite: every transaction takes the write lock when it begins (``BEGIN IMMEDIATE``). Optuna
claims a queued trial by reading it and then marking it RUNNING; SQLite's default deferred
transactions let two processes read the same WAITING trial before either writes, and both
would run it. With the lock taken at BEGIN, the read and the write are one atomic step.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.tracking import network_timeout_s, sqlite_path

DEFAULT_STORAGE = "sqlite:///optuna.db"
MLFLOW_RUN_ATTR = "mlflow_run_id"  # a trial's user attribute: its nested MLflow run (ablations.trials sets it)
SQLITE_TIMEOUT_S = 60  # how long a process waits for SQLite's write lock
SCHEMA_RACE_ATTEMPTS = 5  # opening a fresh storage again after another process created its schema meanwhile
SCHEMA_RACE_MARKS = ("already exists", "unique constraint failed", "duplicate key", "database is locked")


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and MLflow params)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def resolve_storage_url(url: str | None) -> str:
    """Absolute paths for file storages, so that workers started elsewhere find the same file."""
    url = (url or DEFAULT_STORAGE).strip()
    db = sqlite_path(url)
    if db is not None:
        return "sqlite:///" + str(db.resolve())
    if url.startswith("journal:"):
        return "journal:" + str(Path(url[len("journal:"):].removeprefix("//")).resolve())
    if url.startswith("postgresql://"):
        raise UserError(f"storage {redact(url)!r}: write postgresql+psycopg2://... (a bare postgresql:// "
                        "needs psycopg 3, which is not installed)")
    if "://" not in url:
        raise UserError(f"storage {url!r}: use sqlite:///FILE, journal:FILE or postgresql+psycopg2://USER@HOST/DB")
    return url


def open_storage(url: str, *, create: bool):
    """Open the storage (creating an SQLite/journal file and the schema only if ``create``), or raise a one-line UserError."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:"):])
        if not create and not path.is_file():
            raise UserError(f"storage {url!r} does not exist: create the study first with "
                            "python -m ablations.study NAME --storage URL --create-only")
        if not path.parent.is_dir():
            raise UserError(f"storage {url!r}: folder {str(path.parent)!r} does not exist")
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))

    db = sqlite_path(url)
    engine_kwargs: dict = {}
    if db is not None:
        if not create and not db.is_file():
            raise UserError(f"storage {url!r} does not exist: create the study first with "
                            "python -m ablations.study NAME --storage URL --create-only")
        if not db.parent.is_dir():
            raise UserError(f"storage {url!r}: folder {str(db.parent)!r} does not exist")
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    elif url.startswith("postgresql"):
        # an unreachable server fails fast; libpq takes whole seconds (and treats 1 as 2)
        engine_kwargs["connect_args"] = {"connect_timeout": max(2, math.ceil(network_timeout_s()))}
    try:
        storage = create_with_retry(lambda: optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, skip_table_creation=not create), retry=create)
    except Exception as err:  # SQLAlchemy and the drivers raise many types; the user needs one line
        raise UserError(f"storage {redact(url)!r} is unreachable: {_first_line(err)}") from err
    if db is not None:
        _lock_on_begin(storage.engine)
    return storage


def is_schema_race(err: BaseException) -> bool:
    """Whether creating the schema failed because another process was creating it at the same moment."""
    return any(mark in str(err).lower() for mark in SCHEMA_RACE_MARKS)


def create_with_retry(make, *, retry: bool = True, attempts: int = SCHEMA_RACE_ATTEMPTS, pause_s: float = 0.2):
    """``make()``, called again (after a short pause) when it lost the schema-creation race to another process.

    The second call finds the tables the other process made and creates only what is still missing.
    """
    for attempt in range(1, attempts + 1):
        try:
            return make()
        except Exception as err:  # SQLAlchemy wraps the driver's errors in many types
            if not retry or attempt == attempts or not is_schema_race(err):
                raise
            time.sleep(pause_s * attempt)


def _lock_on_begin(engine) -> None:
    """Make every SQLite transaction BEGIN IMMEDIATE (see the module docstring), per SQLAlchemy's recipe."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # the driver leaves BEGIN to us

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed are dropped


def _first_line(err: BaseException) -> str:
    cause = getattr(err, "orig", None) or err.__cause__ or err
    text = str(cause).strip().splitlines()
    return (text[0] if text else type(cause).__name__)[:200]


def load_existing_study(name: str, storage, url: str):
    """The Optuna study ``name`` in ``storage``, or a one-line UserError saying how to create it."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise UserError(f"no study {name!r} in storage {redact(url)!r}; create it first with "
                        f"python -m ablations.study {name.split('/')[0]} --storage {redact(url)} --create-only") from None
    except Exception as err:  # e.g. tables missing in a fresh database
        raise UserError(f"cannot read study {name!r} from storage {redact(url)!r}: {_first_line(err)}; "
                        "create it first with python -m ablations.study NAME --storage URL --create-only") from err


CORRECT_ATTR = "correct"  # a final trial's per-item correctness, packed (pack_correct)


def pack_correct(correct: dict[str, dict[Any, float]]) -> dict[str, dict[str, Any]]:
    """Per task, the items' doc ids and correctness as two lists (compact in the storage's JSON):
    ``{task: {"docs": [...], "correct": "0110..."}}``; correctness other than 0/1 keeps its numbers."""
    packed = {}
    for task, items in correct.items():
        docs = sorted(items, key=str)
        values = [items[d] for d in docs]
        binary = all(v in (0, 1) for v in values)
        packed[task] = {"docs": docs, "correct": "".join(str(int(v)) for v in values) if binary else values}
    return packed


def unpack_correct(packed: dict[str, dict[str, Any]] | None) -> dict[str, dict[Any, float]]:
    """The inverse of :func:`pack_correct`."""
    out = {}
    for task, item in (packed or {}).items():
        values = item["correct"]
        values = [float(c) for c in values] if isinstance(values, str) else [float(v) for v in values]
        out[task] = dict(zip(item["docs"], values))
    return out


DIAGNOSTICS_ATTR = "diagnostics"  # a final trial's mechanism measurements (pack_diagnostics)
TRACE_FIELDS = ("losses", "grad_norms", "delta_norms", "effective_ranks", "movements", "alignments")
SIGNIFICANT = 6  # digits kept of each stored measurement: far below any seed-to-seed difference


def _round(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return float(f"{value:.{SIGNIFICANT}g}")
    return None if isinstance(value, float) and math.isnan(value) else value


def pack_diagnostics(row: dict[str, Any], trace) -> dict[str, Any]:
    """One final run's mechanism measurements in the storage's JSON: the numeric measures of its layer ``all``
    row (harness.diagnostics) and its training curves (``TRACE_FIELDS``, as [step, value] pairs), rounded
    to ``SIGNIFICANT`` digits. A study's diagnostics.md is computed from these alone, so the findings can be
    recomputed from the Optuna journal without MLflow."""
    measures = {k: _round(float(v)) for k, v in row.items()
                if k not in ("method", "spec_method", "seed", "layer") and isinstance(v, (int, float))}
    curves = {f: [[int(step), _round(float(v))] for step, v in getattr(trace, f, None) or []] for f in TRACE_FIELDS}
    return {"row": measures, "trace": curves}


def unpack_diagnostics(packed: dict[str, Any] | None) -> tuple[dict[str, float], dict[str, list]] | None:
    """The inverse of :func:`pack_diagnostics`: (measures, curves), None (JSON null) read back as NaN."""
    if not packed:
        return None
    nan = float("nan")
    measures = {k: (nan if v is None else float(v)) for k, v in packed.get("row", {}).items()}
    curves = {f: [(int(s), nan if v is None else float(v)) for s, v in packed.get("trace", {}).get(f, [])]
              for f in TRACE_FIELDS}
    return measures, curves
