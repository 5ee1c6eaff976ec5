"""A wheel built from the repository is a working harness: tasks and study files ship inside it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--model", "tiny-random", "--max-steps", "2", "--limit", "3", "--batch-size", "4",
         "--eval-batch-size", "8", "--tasks", "arithmetic_add_sub"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, installed (without dependencies: they are this interpreter's) into a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("lora_harness-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                    str(tmp / "site"), str(wheel)], check=True, capture_output=True, timeout=300)
    return wheel, tmp / "site"


def _env(site: Path) -> dict:
    # Only the installed copy is importable: the repository is neither on the path nor the working directory.
    return {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.mark.integration
def test_wheel_contains_tasks_and_study_files(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    tasks = [n for n in names if n.startswith("harness/tasks/")]
    assert "harness/tasks/utils.py" in names and any(n.endswith("arithmetic.yaml") for n in tasks)
    assert sum(n.endswith(".yaml") for n in tasks) == len(list((ROOT / "harness" / "tasks").glob("*.yaml")))
    studies = {Path(n).stem for n in names if n.startswith("ablations/studies/") and n.endswith(".yaml")}
    assert studies == {p.stem for p in (ROOT / "ablations" / "studies").glob("*.yaml")}


@pytest.mark.integration
def test_installed_wheel_runs_the_harness_and_a_study_from_elsewhere(installed, tmp_path):
    _, site = installed
    where = subprocess.run([sys.executable, "-c", "import harness, ablations; print(harness.__file__); "
                            "print(ablations.__file__)"], cwd=tmp_path, env=_env(site), capture_output=True,
                           text=True, check=True)
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    done = subprocess.run([sys.executable, "-m", "harness.run", *SMOKE, "--methods", "lora",
                           "--run-name", "w", "--output-dir", str(tmp_path / "results")],
                          cwd=tmp_path, env=_env(site), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "results" / "w" / "summary.md").is_file()
    study = subprocess.run([sys.executable, "-m", "ablations.study", "chain_length", *SMOKE, "--seeds", "0",
                            "--output-dir", str(tmp_path / "results")],
                           cwd=tmp_path, env=_env(site), capture_output=True, text=True, timeout=900)
    assert study.returncode == 0, study.stderr[-3000:]
    assert (tmp_path / "results" / "ablations" / "chain_length" / "summary.md").is_file()
