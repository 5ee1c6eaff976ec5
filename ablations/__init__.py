"""Ablation and tuning studies over the harness pipeline, with Optuna.

A study is a small YAML file (``ablations/studies/<name>.yaml``) that says which adapter
configurations to compare and which ``harness.run`` options to fix. Every trial is one
call of :func:`harness.run.run` (train, lm-eval, MLflow): the same pipeline as the main
job, not a copy of it.

- :mod:`ablations.studyfile`: read and check a study file; enumerate its grid exactly;
- :mod:`ablations.kinds`: the study kinds (grid, tpe, pareto, fair), one class each in the registry
  ``KINDS``, with every hook in which they differ;
- :mod:`ablations.storage`: open the Optuna storage (SQLite, journal file, PostgreSQL);
- :mod:`ablations.trials`: the objective and the worker loop (claim a queued trial, run it,
  heartbeat, fail and re-queue trials of dead workers);
- :mod:`ablations.fair`: the fair protocol (the same learning-rate grid for every method, chosen
  on validation, then fresh seeds scored once on test) and its verdict against LoRA;
- :mod:`ablations.report`: ``results/ablations/<study>/`` (trials.csv, summary.md or verdict.md, plots);
- ``python -m ablations.study NAME``: create or resume a study, run it, report;
- ``python -m ablations.worker NAME --storage URL``: one more worker on an existing study.
"""
