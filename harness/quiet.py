"""Quiet by default: the libraries' routine chatter stays off the console; ``--verbose`` shows it.

What a user would otherwise read on every run, and why it carries nothing for them:

- lm-eval's "`pretrained` model kwarg is not of type `str` ..." and "Passed an already-initialized
  model ..." warnings: the harness passes its in-memory model on purpose (see harness.evaluate);
- ``fatal: not a git repository``: lm-eval runs ``git describe`` in the working directory for its
  own result files, which the harness does not write (the harness records its own commit);
- MLflow's INFO lines ("Creating initial MLflow database tables ...");
- transformers' and peft's FutureWarnings (deprecations inside the libraries, once per trial);
- lm-eval's progress bar over the documents while it builds prompts, which names nothing
  (it is labelled here, and hidden unless verbose: it takes no measurable time).

The entry points call :func:`configure` first thing (before importing the libraries, which read
some of these settings from the environment when they load). The choice lives in the environment
(``HARNESS_VERBOSE=1``), so a study's worker processes and a torchrun job's ranks follow it too.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import subprocess
import warnings
from typing import Sequence

VERBOSE_ENV = "HARNESS_VERBOSE"

# What every command runs under unless the user's environment says otherwise: no downloads (a model or
# data set that is not on disk is a UserError naming it), no tokenizers fork warning, no MLflow telemetry.
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "MLFLOW_DISABLE_TELEMETRY": "true"}


def offline_environment() -> None:
    """Set :data:`OFFLINE_ENVIRONMENT` where the user's environment leaves it unset (call before the libraries load)."""
    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def verbose_requested(argv: Sequence[str] | None) -> bool:
    """Whether a command line asks for ``--verbose`` (the commands' own parsers document the flag)."""
    import sys

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--verbose", action="store_true")
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    return known.verbose


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def configure(verbose: bool = False) -> None:
    """Silence the libraries' routine output (or, ``verbose``, leave every library at its default)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        os.environ.setdefault("LMEVAL_LOG_LEVEL", "WARNING")  # harness.evaluate asks lm-eval for errors only
        return
    if is_verbose():  # set by the user or by a parent command
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("LMEVAL_LOG_LEVEL", "ERROR")  # lm-eval's setup_logging reads it on every evaluation
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # in case mlflow was imported already
    warnings.filterwarnings("ignore", category=FutureWarning)


def quiet_lm_eval() -> None:
    """lm-eval's own output, whatever the verbosity: no ``git describe`` on stderr, a named prompt-building bar.

    Called by harness.evaluate just before it runs lm-eval (importing lm-eval any earlier would slow
    every command that fails on its input).
    """
    import lm_eval.api.task
    import lm_eval.evaluator

    if getattr(lm_eval.evaluator.get_git_commit_hash, "__module__", "") == __name__:
        return  # already done in this process
    lm_eval.evaluator.get_git_commit_hash = _git_describe
    lm_eval.api.task.tqdm = functools.partial(lm_eval.api.task.tqdm, desc="lm-eval: building prompts",
                                              unit="doc", disable=not is_verbose())


def _git_describe() -> str | None:
    """lm-eval's ``get_git_commit_hash`` with git's complaint outside a checkout kept off the console."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None
