"""Shared fixtures: the tiny in-memory model and the benchmark data directory.

The data directory is ``$HARNESS_DATA_DIR``, else ``../shared/data/llm-adapters`` beside the
repository (where CI keeps the mirror). Tests run offline: Hugging Face downloads are disabled.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "llm-adapters"


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HARNESS_DATA_DIR", str(DEFAULT_DATA_DIR))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark mirror; tests that need it are skipped when it is absent."""
    path = Path(os.environ["HARNESS_DATA_DIR"])
    if not (path / "SHA256SUMS").is_file():
        message = f"benchmark data not found in {path} (set HARNESS_DATA_DIR)"
        if os.environ.get("CI"):  # CI always has the mirror: a missing one is a broken set-up, not a skip
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def tiny_model():
    """A fresh ``(model, tokenizer)`` pair of the seeded two-layer tiny-random Llama."""
    from harness.models import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from harness.models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def mlflow_runs_of():
    """A function: every MLflow run in the ``mlflow.db`` of a folder, as ``mlflow.search_runs`` returns them."""
    import mlflow

    def runs_of(folder: Path):
        mlflow.set_tracking_uri(f"sqlite:///{Path(folder) / 'mlflow.db'}")
        try:
            return mlflow.search_runs(search_all_experiments=True)
        finally:
            mlflow.set_tracking_uri(None)

    return runs_of
