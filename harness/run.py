"""``python -m harness.run``: train every method on the same base model and data, evaluate, track, report.

The story of a run, top to bottom:

1. resolve the configuration (defaults < ``--config`` YAML < command line) and check
   everything a user can get wrong before any training: method specs, tasks, data,
   the tracking store, the output folder, and contamination (training records that ask
   questions of the split to be scored: :mod:`harness.contamination`);
2. evaluate the base model once (the ``base`` row);
3. for each seed and method: a fresh copy of the base model, the adapter, training,
   evaluation on every task, the adapter saved; one nested MLflow run each. A failure
   (a NaN loss, a crash) marks that run FAILED and the others go on;
4. write results/<run name>/ (summary.md, summary.csv, plots, config.yaml) and log it.

Under ``torchrun`` every rank trains each method in step (data parallel); rank 0 alone
evaluates, logs to MLflow and writes results/ (see :mod:`harness.distributed`).

Ctrl-C marks the MLflow runs KILLED and removes the unfinished results folder. The folder is
written under a hidden name and renamed at the end (:mod:`harness.rundir`), so even ``kill -9``
leaves no partial ``results/<name>/``; the next run removes what such a run left and marks its
MLflow runs KILLED (:meth:`harness.tracking.Tracker.reconcile`).
"""

from __future__ import annotations

import gc
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness import contamination, distributed, quiet, reuse, rundir, tuned_rates
from harness import data as hdata
from harness.adapters import (fresh_adapter_model, resolve_match, resolve_spec, save_adapter, trainable_parameters,
                              validate_against_model)
from harness.config import RunConfig, config_from_args, config_to_dict
from harness.data import build_train_dataset, load_records, records_checksum
from harness.diagnostics import RunDiagnostics
from harness.errors import EXIT_INTERRUPTED, DiskFull, UserError, cli_entry, disk_full, full_disk_path, interruption
from harness.evaluate import EvalResult, TaskSuite
from harness.fingerprint import protocol_fingerprint, sha256_json
from harness.fsutil import check_writable_dir
from harness.models import resolve_precision, storage_dtype
from harness.report import SystemResult, default_run_name, grad_norm_summary, method_settings, score_line, write_report
from harness.resultfile import RESULT_FILE, build_result, write_result_json
from harness.rundir import KEPT_FILE
from harness.tracking import (NoTracking, RunHandle, Tracker, _NoRun, check_tracking_uri, loaded_commit, log_summary,
                              run_params)
from harness.train import NonFiniteLoss, TrainResult, TrainSettings


@dataclass
class MethodResult(SystemResult):
    """One evaluated system of a run: the base model (``method="base"``, no seed, no training) or one method
    trained with one seed.

    It is a :class:`harness.report.SystemResult`, the one record the report, result.json, compare and the
    studies read, that also keeps what training and evaluation returned (:class:`harness.train.TrainResult`,
    :class:`harness.evaluate.EvalResult`; None where that step did not run or failed).
    :meth:`record_training` and :meth:`record_evaluation` (or the ``training`` and ``evaluation`` arguments)
    fill the record's fields from them: ``scores``, ``correct`` and ``outputs`` from the evaluation, the
    timings, ``loss_curve`` and the gradient-norm summary from the training. ``error`` is set when the run failed.
    """

    training: TrainResult | None = None
    evaluation: EvalResult | None = None

    def __post_init__(self) -> None:
        if self.training is not None:
            self.record_training(self.training)
        if self.evaluation is not None:
            self.record_evaluation(self.evaluation)

    def record_training(self, trained: TrainResult) -> TrainResult:
        """Keep ``trained`` and copy its loss curve, timings and gradient-norm summary into the record."""
        self.training = trained
        self.loss_curve = trained.losses
        self.train_seconds = trained.train_seconds
        self.seconds_per_step = trained.seconds_per_step
        self.tokens_per_second = trained.tokens_per_second
        self.peak_memory_mb = trained.peak_memory_mb
        self.grad_norm_median = grad_norm_summary(trained)[0]
        self.clipped_fraction = trained.clipped_fraction
        return trained

    def record_evaluation(self, evaluation: EvalResult) -> EvalResult:
        """Keep ``evaluation`` and copy its leaf scores, per-item correctness and output digests into the record."""
        self.evaluation = evaluation
        self.scores = evaluation.leaf_scores()
        self.correct = evaluation.correctness()
        self.outputs = evaluation.output_digests()
        return evaluation


@dataclass
class RunOutcome:
    """What a finished run produced: its folder, the base row, one result per method and seed."""

    run_dir: Path | None  # None on the ranks other than 0 of a torchrun job: they write nothing
    base: object
    results: list = field(default_factory=list)
    parent_run_id: str | None = None
    contamination: dict = field(default_factory=dict)  # task -> harness.contamination.Overlap of the scored split
    contaminated: set = field(default_factory=set)  # tasks whose scores are marked: overlap above the limit
    diagnostics: object = None  # harness.diagnostics.RunDiagnostics: its rows and traces (a study's trial reads them)
    fingerprint: dict | None = None  # harness.fingerprint.protocol_fingerprint of the run (a study's trial records it)

    @property
    def failed(self) -> list:
        return [r for r in self.results if not r.ok]


@dataclass
class MethodPlan:
    """One method of the run: its resolved spec and the label that names it in tables, plots and MLflow."""

    spec: object
    label: str


def plan_methods(cfg: RunConfig, model=None) -> list[MethodPlan]:
    """Parse every method spec with the run's common options; unique labels for the report.

    With the base ``model``, ``lora:match=...`` specs get their rank (and their label shows it).
    """
    specs = [resolve_spec(text, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets)
             for text in cfg.methods]
    if model is not None:
        specs = [resolve_match(s, model) for s in specs]
    labels = [s.label for s in specs]
    if len(set(labels)) < len(labels):  # e.g. the same method at two learning rates: fall back to the spec text
        labels = [s.text if labels.count(lbl) > 1 else lbl for s, lbl in zip(specs, labels)]
    if len(set(labels)) < len(labels):
        raise UserError(f"--methods lists the same method twice: {', '.join(cfg.methods)}")
    return [MethodPlan(spec, label) for spec, label in zip(specs, labels)]


class Pruned(Exception):
    """Raised by an ``on_intermediate`` callback to stop a run early (an ablation study pruning a trial)."""


@dataclass
class RunInputs:
    """What step 1 resolved and checked: everything the rest of the run reads besides the configuration."""

    plans: list[MethodPlan]
    model: Any  # the base model, on the run's device; every method trains a copy
    tokenizer: Any
    examples: dict[int, list]  # each seed's tokenised training examples
    collate: Callable
    precision: str  # resolved: fp32 or bf16
    data_dir: Path
    suite: TaskSuite  # the tasks scored, with the run's one lm-eval TaskManager: checksums, documents, protocol, scores
    eval_kwargs: dict[str, Any]  # TaskSuite.evaluate's keyword arguments: limit, decoding, precision
    train_checksums: dict[str, str]
    eval_checksums: dict[str, str]
    overlaps: dict  # task -> harness.contamination.Overlap
    contaminated: set[str]
    fixed: reuse.FixedCosts | None = None  # a study worker's shared fixed costs (harness.reuse), or None


@dataclass
class MethodContext:
    """What every method's run shares, built once by :func:`run`: ``_run_method(cfg, plan, seed, context)``.

    On the ranks other than 0 of a torchrun job ``is_main`` is False: the tracker records nothing
    (:class:`harness.tracking.NoTracking`) and there is no parent run, results folder or diagnostics.
    """

    model: Any  # the base model
    tokenizer: Any
    examples: dict[int, list]  # by seed
    collate: Callable
    suite: TaskSuite  # evaluates every model of the run: suite.evaluate(model, tokenizer, **eval_kwargs)
    eval_kwargs: dict[str, Any]
    tracker: Tracker | NoTracking
    parent: RunHandle | _NoRun | None  # the run's MLflow run (NoTracking's stand-in without a store)
    run_dir: Path | None  # samples/ and adapters/ go here
    contaminated: set[str]  # marked on every result
    progress: bool
    log: Callable
    intermediate_every: int | None  # with on_intermediate(label, seed, step, average): a study's pruning
    on_intermediate: Callable | None
    data_parallel: bool  # a torchrun job: a crash before training has finished ends the whole job
    diagnostics: RunDiagnostics | None
    is_main: bool


def run(cfg: RunConfig, *, parent=None, tracker=None, write_results: bool = True, progress: bool = True,
        evaluate_base: bool | str = True, intermediate_every: int | None = None, on_intermediate=None,
        known_curvature=None, log=print) -> RunOutcome:
    """Run the whole pipeline for ``cfg``.

    Ablation studies use the keyword arguments: ``parent``/``tracker`` nest the run under an existing
    MLflow run, ``write_results=False`` skips results/, ``evaluate_base=False`` skips the base row
    (``"if_failed"``: evaluates it only after a method failed, so a fair study can score a diverged
    final run as the base model it fell back to), and
    ``on_intermediate(label, seed, step, average_score)`` is called every ``intermediate_every`` training
    steps after a quick evaluation (with ``cfg.limit`` items); raising :class:`Pruned` there stops the run.
    ``known_curvature`` (seed -> :class:`harness.diagnostics.Eigenvalue`) is lambda_max at initialisation already
    measured for this run's one method (a study's earlier trial at another rate): ``diagnostics: full`` reuses it.
    """
    loaded_commit()  # the commit of the code this process runs, read before a long run gives time to commit another
    job = distributed.context()
    if job.distributed and on_intermediate is not None:
        raise UserError("ablation trials run one process each: start more study workers instead of torchrun")
    if not job.is_main:
        log = _quiet

    # 1. Everything a user can get wrong, before any training.
    inputs = _resolve_and_check(cfg, job, check_tracking=tracker is None, check_output=write_results, log=log)
    shared = dict(model=inputs.model, tokenizer=inputs.tokenizer, examples=inputs.examples, collate=inputs.collate,
                  suite=inputs.suite, eval_kwargs=inputs.eval_kwargs, contaminated=inputs.contaminated, log=log,
                  intermediate_every=intermediate_every, on_intermediate=on_intermediate,
                  data_parallel=job.distributed, is_main=job.is_main)
    if not job.is_main:  # train every method in step with rank 0, which evaluates, tracks and reports for the job
        _every_method(cfg, inputs.plans, MethodContext(**shared, tracker=NoTracking(), parent=None, run_dir=None,
                                                       progress=False, diagnostics=None))
        return RunOutcome(run_dir=None, base=None)

    fingerprint = protocol_fingerprint(cfg, model=inputs.model, tokenizer=inputs.tokenizer,
                                       train_checksum=inputs.train_checksums.get("train_data")
                                       or sha256_json(inputs.train_checksums),
                                       eval_checksums=inputs.eval_checksums, data_dir=inputs.data_dir,
                                       world_size=job.world_size, precision=inputs.precision, suite=inputs.suite)
    run_name = cfg.run_name or default_run_name()
    if tracker is None:  # a run of its own (not a study's trial): reconcile what killed runs left behind
        tracker = Tracker(cfg.tracking_uri, cfg.experiment)
        tracker.reconcile(log)
        if write_results:
            rundir.clean_partials(cfg.output_dir, log)
    try:
        staged = rundir.reserve(cfg.output_dir, run_name, taken=tracker.names_in_use(run_name)) if write_results else None
    except OSError as err:
        if not disk_full(err):
            raise
        raise DiskFull(f"the disk is full under {cfg.output_dir}: the run did not start and wrote nothing there; "
                       "free some space and run it again") from err
    run_dir = staged.path if staged else Path(tempfile.mkdtemp(prefix="run-"))
    outcome = RunOutcome(run_dir=run_dir, base=None, contamination=inputs.overlaps, contaminated=inputs.contaminated,
                         fingerprint=fingerprint)
    where = f"{job.device}, {inputs.precision}" + (f", {job.world_size} ranks" if job.distributed else "")
    log(f"run {run_dir.name}: {len(inputs.plans)} method(s) x {len(cfg.seeds)} seed(s) on {cfg.model} ({where}), "
        f"{len(inputs.examples[cfg.seeds[0]])} training examples, tasks {', '.join(cfg.tasks)} ({cfg.split} split); "
        f"results in {staged.final if staged else run_dir}")
    # one fixed batch for the curvature probe: the first seed's training examples
    fixed = inputs.fixed
    diagnostics = RunDiagnostics(cfg.diagnostics, inputs.tokenizer, inputs.examples[cfg.seeds[0]], inputs.collate,
                                 known_curvature=known_curvature, base_model=inputs.model,
                                 base=fixed.base_measures(inputs.model) if fixed is not None else None,
                                 step_alignment=not job.distributed)  # rank 0's G would be its own batches' only
    outcome.diagnostics = diagnostics
    finished, kept = False, None
    try:
        top_name = run_dir.name if write_results else run_name
        with tracker.run(top_name, parent=parent, tags={"kind": "benchmark", "protocol": fingerprint["hash"]}) as top:
            outcome.parent_run_id = top.run_id
            checksums = {**inputs.train_checksums, **inputs.eval_checksums}
            top.log_params({**run_params(config_to_dict(cfg), checksums), "resolved_precision": inputs.precision})
            top.client.log_dict(top.run_id, fingerprint, "protocol_fingerprint.json")
            if inputs.overlaps:
                top.log_metrics({f"contamination/{task}": o.share for task, o in inputs.overlaps.items()})
            context = MethodContext(**shared, tracker=tracker, parent=top, run_dir=run_dir, progress=progress,
                                    diagnostics=diagnostics)

            # 2. The base model, once.
            if evaluate_base is True:
                outcome.base = _evaluate_base(context)

            # 3. Every method and seed, each from a fresh copy of the base model.
            outcome.results = _every_method(cfg, inputs.plans, context)
            if evaluate_base == "if_failed" and outcome.failed:
                outcome.base = _evaluate_base(context)

            # 4. The report.
            if write_results:
                outcome.run_dir = _report(cfg, inputs, fingerprint, outcome, context, staged)
            if outcome.failed:
                top.set_tags({"failed_runs": ", ".join(f"{r.method}/seed{r.seed}" for r in outcome.failed)})
        finished = True
    except Exception as err:
        if not disk_full(err):
            raise
        if staged is not None:  # what the finished methods wrote stays, unpublished, with a note
            kept = staged.keep(f"The disk filled up during this run (writing {full_disk_path(err) or 'a file'}).")
        raise DiskFull(_disk_full_line(err, staged)) from err
    finally:
        if staged is not None and not finished and kept is None:
            staged.discard()  # nothing half-written stays in results/
        if not write_results:
            shutil.rmtree(run_dir, ignore_errors=True)
    return outcome


def _disk_full_line(err: BaseException, staged) -> str:
    """The one line a run stopped by a full disk ends with: where, what was kept and where it is."""
    where = full_disk_path(err)
    said = f"the disk is full (writing {where})" if where else f"the disk is full ({type(err).__name__}: {err})"
    if staged is None:
        return f"{said}: the run stopped; free some space and run it again"
    parts = staged.finished_parts()
    kept = (f"the per-item samples of {', '.join(parts)} (and the adapters saved) are kept in {staged.path}"
            if parts else f"no evaluation had finished; {staged.reservation} is kept for inspection")
    return (f"{said}: the run stopped and was not published; {kept} (see {KEPT_FILE} there); MLflow runs are "
            "marked FAILED (KILLED by the next run where the store itself was full); free some space and run again")


# ----------------------------------------------------------------------------------------------------------
# 1. Resolve and check


def _resolve_and_check(cfg: RunConfig, job, *, check_tracking: bool, check_output: bool, log) -> RunInputs:
    """Method specs, precision, tasks and their data, training data, contamination, the tracking store, the
    output folder, the base model and the specs against its layers: every check before any training.

    Only rank 0 (``job.is_main``) checks the tracking store (it alone creates the SQLite schema and tracks)
    and the output folder.
    """
    from harness.models import load_model  # looked up per call: tests replace harness.models.load_model

    plans = plan_methods(cfg)
    precision = resolve_precision(cfg.precision, job.device)  # bf16 on hardware without it fails here
    data_dir = hdata.resolve_data_dir(cfg.data_dir)
    fixed = reuse.current()  # a study worker's trials share the base model, the suite and the base measures
    # one per run (one lm-eval TaskManager), or one per study worker
    suite = (fixed.suite(cfg.tasks, data_dir, cfg.prompt_format, cfg.split) if fixed is not None
             else TaskSuite(cfg.tasks, data_dir, cfg.prompt_format, cfg.split))
    eval_checksums = suite.checksums()  # also rejects unknown tasks
    records = training_records(cfg, data_dir)
    overlaps, contaminated = check_contamination(cfg, records, data_dir, log, suite=suite)
    if check_tracking and job.is_main:
        check_tracking_uri(cfg.tracking_uri)
    if check_output and job.is_main:
        check_writable_dir(cfg.output_dir, "--output-dir")
    if fixed is not None:
        model, tokenizer = fixed.model(cfg.model, storage_dtype(precision), job.device)
    else:
        model, tokenizer = load_model(cfg.model, dtype=storage_dtype(precision))  # a bf16 base is stored so once
    for plan in plans:
        validate_against_model(model, plan.spec)
    plans = plan_methods(cfg, model)  # lora:match=... needs the layer shapes to choose its rank
    examples = _examples_by_seed(records, tokenizer, cfg)
    model.to(job.device)
    eval_kwargs = dict(limit=cfg.limit, batch_size=cfg.eval_batch_size, num_beams=cfg.num_beams, precision=precision)
    return RunInputs(plans=plans, model=model, tokenizer=tokenizer, examples=examples,
                     collate=hdata.collate_for(tokenizer), precision=precision, data_dir=data_dir, suite=suite,
                     eval_kwargs=eval_kwargs, train_checksums=training_checksums(records),
                     eval_checksums=eval_checksums, overlaps=overlaps, contaminated=contaminated, fixed=fixed)


def training_records(cfg: RunConfig, data_dir: Path) -> dict[int, list[dict]]:
    """Each seed's training records, a function of that seed alone.

    The seed of a run is one whole replication: it draws the generated training set (``arithmetic``),
    the data order and the initial A, so "seed 1" trains on the same data in ``--seeds 1,2`` as in
    ``--seeds 0,1,2``, and the spread over seeds includes the spread over generated training sets.
    A data file is the same for every seed (less its validation slice); it is read once.
    """
    generated = cfg.train_data == "arithmetic" or cfg.train_data.startswith("arithmetic:")
    if not generated:
        records = load_records(cfg.train_data, data_dir)
        return {seed: records for seed in cfg.seeds}
    return {seed: load_records(cfg.train_data, data_dir, seed=seed) for seed in cfg.seeds}


def training_checksums(records: dict[int, list[dict]]) -> dict[str, str]:
    """``train_data`` when every seed trains on the same records, else ``train_data_seed<N>`` per seed."""
    sums = {seed: records_checksum(r) for seed, r in records.items()}
    if len(set(sums.values())) == 1:
        return {"train_data": next(iter(sums.values()))}
    return {f"train_data_seed{seed}": value for seed, value in sums.items()}


def check_contamination(cfg: RunConfig, records: dict[int, list[dict]], data_dir: Path, log=print, suite=None):
    """Overlaps of every seed's training records with the documents the run will score, before any training.

    Returns ``(overlaps by task, contaminated tasks)``; an overlap above 1% of a test split raises
    UserError unless ``cfg.allow_contamination`` (see :mod:`harness.contamination`). The documents come
    from the run's :class:`harness.evaluate.TaskSuite` (``suite``), else from one built for ``cfg``.
    """
    if suite is None:
        documents = contamination.scored_documents(cfg.tasks, data_dir, cfg.prompt_format, cfg.split)
    else:
        documents = suite.documents()
    for task in contamination.unchecked(documents):
        log(f"contamination: {task} not checked (its documents have no instruction field)")
    distinct = {id(r): r for r in records.values()}.values()  # a data file is one list shared by the seeds
    overlaps = contamination.overlaps((r for seed_records in distinct for r in seed_records), documents, cfg.split)
    contaminated = contamination.check(overlaps, cfg.allow_contamination)
    for task in sorted(contaminated):
        o = overlaps[task]
        log(f"warning: {task}: {100 * o.share:.1f}% of its {o.split} items ({o.in_training}/{o.items}) are in the "
            "training data; its scores are marked contaminated")
    return overlaps, contaminated


def _examples_by_seed(records: dict[int, list[dict]], tokenizer, cfg: RunConfig) -> dict[int, list]:
    """Tokenised training examples per seed; seeds sharing one list of records share its examples."""
    built: dict[int, list] = {}
    examples = {}
    for seed, seed_records in records.items():
        if id(seed_records) not in built:
            built[id(seed_records)] = build_train_dataset(
                seed_records, tokenizer, prompt_format=cfg.prompt_format, train_on_inputs=cfg.train_on_inputs,
                cutoff_len=cfg.cutoff_len)
        examples[seed] = built[id(seed_records)]
    return examples


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0: rank 0 speaks for the job."""


# ----------------------------------------------------------------------------------------------------------
# 2. The base model


def _evaluate_base(context: MethodContext) -> MethodResult:
    """The base model's row, evaluated once, in its own nested MLflow run."""
    from harness.tracking import log_evaluation  # looked up per call: tests replace harness.tracking.log_evaluation

    with context.tracker.run("base", parent=context.parent, tags={"method": "base"}) as handle:
        context.log("evaluating the base model ...")
        evaluation = context.suite.evaluate(context.model, context.tokenizer, **context.eval_kwargs)
        base = MethodResult(method="base", evaluation=evaluation, contaminated=set(context.contaminated))
        log_evaluation(handle, evaluation, context.run_dir / "samples" / "base.jsonl")
    context.log("base: " + score_line(base.scores))
    return base


# ----------------------------------------------------------------------------------------------------------
# 3. Every method and seed


def _every_method(cfg: RunConfig, plans: list[MethodPlan], context: MethodContext) -> list[MethodResult]:
    """Each seed, then each method of that seed: one result each.

    Every rank of a torchrun job goes through this same loop, so the ranks train each method in step
    and meet in the same collectives; only rank 0 evaluates and tracks (``context.is_main``). A
    non-finite loss is seen by every rank at the same step (the check uses the mean over ranks):
    rank 0 records that failure and all go on with the next method.
    """
    return [_run_method(cfg, plan, seed, context) for seed in cfg.seeds for plan in plans]


def _run_method(cfg: RunConfig, plan: MethodPlan, seed: int, context: MethodContext) -> MethodResult:
    """Train and evaluate one method with one seed in its own nested MLflow run; a failure is recorded, not raised.

    Under torchrun (``context.data_parallel``) a crash before training has finished ends the whole job
    instead: the other ranks cannot know about it and would wait for this one forever. The ranks other
    than 0 only train.
    """
    # looked up per call: tests replace harness.tracking.log_evaluation and harness.train.train
    from harness.tracking import log_evaluation
    from harness.train import train

    name = f"{plan.label}-seed{seed}"
    spec, log, diagnostics = plan.spec, context.log, context.diagnostics
    settings = TrainSettings.from_config(cfg, spec, seed)
    result = MethodResult(method=plan.label, seed=seed, settings=method_settings(spec, settings.lr, cfg.train_on_inputs),
                          contaminated=set(context.contaminated))
    peft_model = probe = None
    try:
        with context.tracker.run(name, parent=context.parent,
                                 tags={"method": spec.method, "label": plan.label, "seed": seed}) as h:
            h.log_params({"spec": spec.canonical(), "method": spec.method, "label": plan.label, "seed": seed, "split": cfg.split,
                          "lr": settings.lr, "r": spec.r, "alpha": spec.alpha, "init": spec.init,
                          "structure": spec.structure or "", "chain_widths": "-".join(map(str, spec.chain_widths or ())),
                          "resolved_precision": context.eval_kwargs["precision"]})
            peft_model = fresh_adapter_model(context.model, spec, seed)
            result.trainable_params = trainable_parameters(peft_model)
            h.log_metrics({"trainable_params": result.trainable_params})

            def checkpoint(step: int) -> None:
                quick = context.suite.evaluate(peft_model, context.tokenizer,  # noqa: F821 (called before the del below)
                                               **{**context.eval_kwargs, "log_samples": False})
                average = sum(quick.scores.values()) / max(len(quick.scores), 1)
                h.log_metrics({"intermediate_average_accuracy": average}, step=step)
                context.on_intermediate(plan.label, seed, step, average)

            # --- diagnostics: the curvature at init (level full) before training, ||dW|| every few steps
            probe = diagnostics.start(peft_model, seed) if diagnostics and diagnostics.enabled else None
            with h.step_logger() as steps:
                def on_step(s, loss, lr):
                    steps.log(s, train_loss=loss, lr=lr, **(probe.on_step(s) if probe else {}))

                pruning = context.on_intermediate is not None
                trained = result.record_training(train(
                    peft_model, context.examples[seed], context.collate, settings, progress=context.progress,
                    description=name, on_step=on_step, on_checkpoint=checkpoint if pruning else None,
                    checkpoint_every=context.intermediate_every if pruning else None))
                for step, norm in trained.grad_norms:
                    steps.log(step, grad_norm=norm)
            h.log_metrics({"train_seconds": trained.train_seconds, "seconds_per_step": trained.seconds_per_step,
                           "tokens_per_second": trained.tokens_per_second, "peak_memory_mb": trained.peak_memory_mb,
                           "final_train_loss": trained.final_loss, "clipped_fraction": trained.clipped_fraction})
            if probe:  # --- diagnostics: dW, intruders, forgetting, convergence (before the adapter is deleted)
                h.log_metrics(diagnostics.finish(probe, peft_model, method=plan.label, spec_method=spec.method, lr=settings.lr,
                                                 seed=seed, train_result=trained), step=trained.steps)
            if context.is_main:  # the other ranks of a torchrun job only train
                log(f"{name}: evaluating ...")
                result.record_evaluation(context.suite.evaluate(peft_model, context.tokenizer, **context.eval_kwargs))
                log_evaluation(h, result.evaluation, context.run_dir / "samples" / f"{name}.jsonl")
                adapter_dir = save_adapter(peft_model, context.run_dir / "adapters" / name)
                h.log_artifacts(adapter_dir, "adapter")
        log(f"{name}: " + score_line(result.scores) + f" ({result.train_seconds:.0f} s training)")
    except NonFiniteLoss as err:
        if diagnostics:
            diagnostics.record_failure(plan.label, seed)
        result.error = str(err)
        log(f"{name}: FAILED: {err}")
    except (KeyboardInterrupt, UserError, Pruned):
        raise
    except Exception as err:  # a crash in one method must not lose the others
        if disk_full(err):  # not this method's fault, and the next one would fail the same way: stop the run
            raise
        if context.data_parallel and result.training is None:
            raise
        result.error = f"{type(err).__name__}: {err}"
        if diagnostics:
            diagnostics.record_failure(plan.label, seed)
        traceback.print_exc()
        log(f"{name}: FAILED: {result.error}; going on with the other methods")
    finally:
        if probe is not None:  # a run that stopped mid-training (divergence, pruning, Ctrl-C) leaves no hooks armed
            probe.recorder.close()
        del peft_model
        gc.collect()
    return result


# ----------------------------------------------------------------------------------------------------------
# 4. The report


def _report(cfg: RunConfig, inputs: RunInputs, fingerprint: dict, outcome: RunOutcome, context: MethodContext,
            staged) -> Path:
    """Write the results folder (summary, plots, diagnostics, result.json), log it on the parent run, publish it.

    Returns the published folder.
    """
    run_dir, top = context.run_dir, context.parent
    header = {"protocol fingerprint": f"{fingerprint['hash']} (parts in result.json; "
                                      "compare runs with python -m harness.compare)",
              "precision": inputs.precision, **_data_header(cfg, inputs.overlaps, inputs.contaminated)}
    rates = tuned_rates.header_line(cfg, {p.label: p.spec for p in inputs.plans})
    if rates:
        header["learning rates"] = rates
    written = write_report(run_dir, outcome.base, outcome.results, config=cfg, header=header)
    written.update(context.diagnostics.write(run_dir))
    written[RESULT_FILE] = write_result_json(run_dir, build_result(
        run_dir.name, config_to_dict(cfg), fingerprint, outcome.base, outcome.results))
    for path in written.values():
        top.log_artifact(path, "results")
    log_summary(top, run_dir / "summary.csv")
    summary = (run_dir / "summary.md").read_text()
    published = staged.publish()
    context.log(f"\n{summary}")
    context.log(f"results written to {published} ({', '.join(sorted(written))})")
    return published


def _data_header(cfg: RunConfig, overlaps: dict, contaminated: set) -> dict[str, str]:
    """The summary header lines saying which split was scored and how much of it the training data holds."""
    worst = max(overlaps.values(), key=lambda o: o.share, default=None)
    header = {"scored split": cfg.split + ("" if cfg.split == "test" else " (for tuning: not a final result)")}
    if contaminated:
        header["contaminated"] = ", ".join(f"{t} ({100 * overlaps[t].share:.1f}% of its items in training)"
                                           for t in sorted(contaminated))
    elif worst is not None:
        header["contamination"] = f"none above 1% (largest: {worst.task} {100 * worst.share:.1f}%)"
    return header


@cli_entry
def main(argv: list[str] | None = None) -> int:
    quiet.offline_environment()
    quiet.configure(verbose=quiet.verbose_requested(argv))
    cfg = config_from_args(argv)
    started = time.perf_counter()
    try:
        outcome = run(cfg)
    except KeyboardInterrupt as err:
        print(f"\n{interruption(err)}: MLflow runs marked KILLED; nothing was written to results/", file=sys.stderr)
        return EXIT_INTERRUPTED
    ctx = distributed.context()
    distributed.barrier(ctx)  # the other ranks wait for rank 0's last evaluation and report
    distributed.shutdown(ctx)
    if not ctx.is_main:
        return 0
    print(f"done in {time.perf_counter() - started:.0f} s; open the MLflow UI with: "
          f"mlflow ui --backend-store-uri {cfg.tracking_uri or 'sqlite:///mlflow.db'}")
    if outcome.failed:
        print(f"{len(outcome.failed)} run(s) failed: "
              + ", ".join(f"{r.method} seed {r.seed} ({r.error})" for r in outcome.failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
