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

import copy
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from harness import quiet
from harness.config import RunConfig, config_from_args, config_to_dict
from harness.errors import UserError, cli_entry, interruption


@dataclass
class RunOutcome:
    """What a finished run produced: its folder, the base row, one result per method and seed."""

    run_dir: Path | None  # None on the ranks other than 0 of a torchrun job: they write nothing
    base: object
    results: list = field(default_factory=list)
    parent_run_id: str | None = None
    contamination: dict = field(default_factory=dict)  # task -> harness.contamination.Overlap of the scored split
    contaminated: set = field(default_factory=set)  # tasks whose scores are marked: overlap above the limit

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
    from harness.adapters import resolve_match, resolve_spec

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


def records_checksum(records: Sequence[dict]) -> str:
    """SHA-256 of the training records' content (files and generated data alike)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


class Pruned(Exception):
    """Raised by an ``on_intermediate`` callback to stop a run early (an ablation study pruning a trial)."""


def run(cfg: RunConfig, *, parent=None, tracker=None, write_results: bool = True, progress: bool = True,
        evaluate_base: bool = True, intermediate_every: int | None = None, on_intermediate=None,
        log=print) -> RunOutcome:
    """Run the whole pipeline for ``cfg``.

    Ablation studies use the keyword arguments: ``parent``/``tracker`` nest the run under an existing
    MLflow run, ``write_results=False`` skips results/, ``evaluate_base=False`` skips the base row, and
    ``on_intermediate(label, seed, step, average_score)`` is called every ``intermediate_every`` training
    steps after a quick evaluation (with ``cfg.limit`` items); raising :class:`Pruned` there stops the run.
    """
    from harness import data as hdata
    from harness import distributed
    from harness import evaluate as hevaluate
    from harness.adapters import validate_against_model
    from harness import rundir
    from harness.fingerprint import protocol_fingerprint, sha256_json
    from harness.fsutil import check_writable_dir
    from harness.models import load_model, resolve_precision, storage_dtype
    from harness.report import SystemResult, default_run_name, write_report
    from harness.resultfile import RESULT_FILE, build_result, write_result_json
    from harness.tracking import Tracker, check_tracking_uri, run_params

    # 1. Everything a user can get wrong, before any training.
    plans = plan_methods(cfg)
    ctx = distributed.context()
    if ctx.distributed and on_intermediate is not None:
        raise UserError("ablation trials run one process each: start more study workers instead of torchrun")
    if not ctx.is_main:
        log = _quiet
    precision = resolve_precision(cfg.precision, ctx.device)  # bf16 on hardware without it fails here
    data_dir = hdata.resolve_data_dir(cfg.data_dir)
    eval_checksums = task_data_checksums(cfg.tasks, data_dir, cfg.prompt_format, cfg.split)  # also rejects unknown tasks
    records = training_records(cfg, data_dir)
    overlaps, contaminated = check_contamination(cfg, records, data_dir, log)
    if tracker is None and ctx.is_main:  # one process creates the SQLite schema; the others never track
        check_tracking_uri(cfg.tracking_uri)
    if write_results and ctx.is_main:
        check_writable_dir(cfg.output_dir, "--output-dir")
    model, tokenizer = load_model(cfg.model, dtype=storage_dtype(precision))  # a bf16 base is stored so once
    for plan in plans:
        validate_against_model(model, plan.spec)
    plans = plan_methods(cfg, model)  # lora:match=... needs the layer shapes to choose its rank
    examples = _examples_by_seed(hdata, records, tokenizer, cfg)
    device = ctx.device
    model.to(device)
    collate = _collate_for(hdata, tokenizer)
    train_checksums = training_checksums(records)
    checksums = {**train_checksums, **eval_checksums}
    if not ctx.is_main:
        _follow_main_rank(cfg, plans, model, examples, collate)
        return RunOutcome(run_dir=None, base=None)
    fingerprint = protocol_fingerprint(cfg, model=model, tokenizer=tokenizer,
                                       train_checksum=train_checksums.get("train_data")
                                       or sha256_json(train_checksums),
                                       eval_checksums=eval_checksums, data_dir=data_dir,
                                       world_size=ctx.world_size, precision=precision)

    run_name = cfg.run_name or default_run_name()
    if tracker is None:  # a run of its own (not a study's trial): reconcile what killed runs left behind
        tracker = Tracker(cfg.tracking_uri, cfg.experiment)
        tracker.reconcile(log)
        if write_results:
            rundir.clean_partials(cfg.output_dir, log)
    staged = rundir.reserve(cfg.output_dir, run_name, taken=tracker.names_in_use(run_name)) if write_results else None
    run_dir = staged.path if staged else Path(tempfile.mkdtemp(prefix="run-"))
    outcome = RunOutcome(run_dir=run_dir, base=None, contamination=overlaps, contaminated=contaminated)
    where = f"{device}, {precision}" + (f", {ctx.world_size} ranks" if ctx.distributed else "")
    log(f"run {run_dir.name}: {len(plans)} method(s) x {len(cfg.seeds)} seed(s) on {cfg.model} ({where}), "
        f"{len(examples[cfg.seeds[0]])} training examples, tasks {', '.join(cfg.tasks)} ({cfg.split} split); "
        f"results in {staged.final if staged else run_dir}")
    eval_kwargs = dict(tasks=cfg.tasks, data_dir=data_dir, limit=cfg.limit, batch_size=cfg.eval_batch_size,
                       num_beams=cfg.num_beams, prompt_format=cfg.prompt_format, split=cfg.split,
                       precision=precision)
    from harness.diagnostics import RunDiagnostics  # --- diagnostics (harness.diagnostics)

    # one fixed batch for the curvature probe: the first seed's training examples
    diagnostics = RunDiagnostics(cfg.diagnostics, tokenizer, examples[cfg.seeds[0]], collate)
    finished = False
    try:
        top_name = run_dir.name if write_results else run_name
        with tracker.run(top_name, parent=parent, tags={"kind": "benchmark", "protocol": fingerprint["hash"]}) as top:
            outcome.parent_run_id = top.run_id
            top.log_params({**run_params(config_to_dict(cfg), checksums), "resolved_precision": precision})
            top.client.log_dict(top.run_id, fingerprint, "protocol_fingerprint.json")
            if overlaps:
                top.log_metrics({f"contamination/{task}": o.share for task, o in overlaps.items()})

            # 2. The base model, once.
            if evaluate_base:
                with tracker.run("base", parent=top, tags={"method": "base"}) as handle:
                    log("evaluating the base model ...")
                    evaluation = hevaluate.evaluate(model, tokenizer, **eval_kwargs)
                    outcome.base = SystemResult(method="base", scores=_leaf_scores(evaluation),
                                                correct=_correctness(evaluation), contaminated=set(contaminated))
                    _log_evaluation(handle, evaluation, run_dir / "samples" / "base.jsonl")
                log("base: " + _score_line(outcome.base.scores))

            # 3. Every method and seed, each from a fresh copy of the base model.
            for seed in cfg.seeds:
                for plan in plans:
                    result = _run_method(cfg, plan, seed, model, tokenizer, examples[seed], collate, eval_kwargs,
                                         tracker, top, run_dir, progress, log, intermediate_every, on_intermediate,
                                         data_parallel=ctx.distributed, diagnostics=diagnostics)
                    result.contaminated = set(contaminated)
                    outcome.results.append(result)

            # 4. The report.
            if write_results:
                written = write_report(run_dir, outcome.base, outcome.results, config=cfg,
                                       header={"protocol fingerprint": f"{fingerprint['hash']} (parts in result.json; "
                                                                       "compare runs with python -m harness.compare)",
                                               "precision": precision, **_data_header(cfg, overlaps, contaminated)})
                written.update(diagnostics.write(run_dir))
                written[RESULT_FILE] = write_result_json(run_dir, build_result(
                    run_dir.name, config_to_dict(cfg), fingerprint, outcome.base, outcome.results))
                for path in written.values():
                    top.log_artifact(path, "results")
                _log_summary_on_parent(top, run_dir / "summary.csv")
                summary = (run_dir / "summary.md").read_text()
                outcome.run_dir = staged.publish()
                log(f"\n{summary}")
                log(f"results written to {outcome.run_dir} ({', '.join(sorted(written))})")
            if outcome.failed:
                top.set_tags({"failed_runs": ", ".join(f"{r.method}/seed{r.seed}" for r in outcome.failed)})
        finished = True
    finally:
        if staged is not None and not finished:
            staged.discard()  # nothing half-written stays in results/
        if not write_results:
            shutil.rmtree(run_dir, ignore_errors=True)
    return outcome


def _log_summary_on_parent(top, summary_csv: Path) -> None:
    """Put the per-method summary on the parent run, so the MLflow UI compares methods without expanding runs.

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
    top.log_metrics(metrics)
    top.client.log_table(top.run_id, data=table, artifact_file="summary_table.json")


def training_records(cfg: RunConfig, data_dir: Path) -> dict[int, list[dict]]:
    """Each seed's training records, a function of that seed alone.

    The seed of a run is one whole replication: it draws the generated training set (``arithmetic``),
    the data order and the initial A, so "seed 1" trains on the same data in ``--seeds 1,2`` as in
    ``--seeds 0,1,2``, and the spread over seeds includes the spread over generated training sets.
    A data file is the same for every seed (less its validation slice); it is read once.
    """
    from harness.data import load_records

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


def check_contamination(cfg: RunConfig, records: dict[int, list[dict]], data_dir: Path, log=print):
    """Overlaps of every seed's training records with the documents the run will score, before any training.

    Returns ``(overlaps by task, contaminated tasks)``; an overlap above 1% of a test split raises
    UserError unless ``cfg.allow_contamination`` (see :mod:`harness.contamination`).
    """
    from harness import contamination

    documents = contamination.scored_documents(cfg.tasks, data_dir, cfg.prompt_format, cfg.split)
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


def _examples_by_seed(hdata, records: dict[int, list[dict]], tokenizer, cfg: RunConfig) -> dict[int, list]:
    """Tokenised training examples per seed; seeds sharing one list of records share its examples."""
    built: dict[int, list] = {}
    examples = {}
    for seed, seed_records in records.items():
        if id(seed_records) not in built:
            built[id(seed_records)] = hdata.build_train_dataset(
                seed_records, tokenizer, prompt_format=cfg.prompt_format, train_on_inputs=cfg.train_on_inputs,
                cutoff_len=cfg.cutoff_len)
        examples[seed] = built[id(seed_records)]
    return examples


def _train_settings(cfg: RunConfig, spec, seed: int):
    from harness.train import TrainSettings

    return TrainSettings(lr=spec.lr or cfg.lr, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                         max_steps=cfg.max_steps, epochs=cfg.epochs, warmup_ratio=cfg.warmup_ratio,
                         weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=seed,
                         precision=cfg.precision)


def _fresh_adapter_model(base_model, spec, seed: int):
    """A copy of the base model with the method's adapter; the same seed gives every method the same initial A."""
    import torch

    from harness.adapters import get_adapter_model

    torch.manual_seed(seed)
    return get_adapter_model(copy.deepcopy(base_model), spec)


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0: rank 0 speaks for the job."""


def _follow_main_rank(cfg: RunConfig, plans, base_model, examples, collate) -> None:
    """A rank other than 0 of a torchrun job: train every method in step with rank 0, nothing else.

    ``examples`` maps each seed to its training examples, as on rank 0.

    The order (seeds, then methods) and each method's start are rank 0's, so the ranks meet in the same
    collectives. A non-finite loss is seen by every rank at the same step (the check uses the mean over
    ranks); rank 0 records that failure and all go on with the next method.
    """
    from harness.train import NonFiniteLoss, train

    for seed in cfg.seeds:
        for plan in plans:
            model = _fresh_adapter_model(base_model, plan.spec, seed)
            try:
                train(model, examples[seed], collate, _train_settings(cfg, plan.spec, seed), progress=False)
            except NonFiniteLoss:
                pass
            finally:
                del model
                gc.collect()


def _run_method(cfg, plan, seed, base_model, tokenizer, examples, collate, eval_kwargs, tracker, top, run_dir,
                progress, log, intermediate_every=None, on_intermediate=None, data_parallel=False, diagnostics=None):
    """Train and evaluate one method with one seed in its own nested MLflow run; a failure is recorded, not raised.

    Under torchrun (``data_parallel``) a crash before training has finished ends the whole job instead: the
    other ranks cannot know about it and would wait for this one forever.
    """
    from harness import evaluate as hevaluate
    from harness.adapters import save_adapter, trainable_parameters
    from harness.report import SystemResult, grad_norm_summary, method_settings
    from harness.train import NonFiniteLoss, train

    name = f"{plan.label}-seed{seed}"
    spec = plan.spec
    settings = _train_settings(cfg, spec, seed)
    result = SystemResult(method=plan.label, seed=seed, settings=method_settings(spec, settings.lr, cfg.train_on_inputs))
    peft_model = None
    trained = None
    try:
        with tracker.run(name, parent=top, tags={"method": spec.method, "label": plan.label, "seed": seed}) as h:
            h.log_params({"spec": spec.canonical(), "method": spec.method, "label": plan.label, "seed": seed, "split": cfg.split,
                          "lr": settings.lr, "r": spec.r, "alpha": spec.alpha, "init": spec.init,
                          "structure": spec.structure or "", "chain_widths": "-".join(map(str, spec.chain_widths or ())),
                          "resolved_precision": eval_kwargs["precision"]})
            peft_model = _fresh_adapter_model(base_model, spec, seed)
            result.trainable_params = trainable_parameters(peft_model)
            h.log_metrics({"trainable_params": result.trainable_params})
            def checkpoint(step: int) -> None:
                quick = hevaluate.evaluate(peft_model, tokenizer, **{**eval_kwargs, "log_samples": False})
                average = sum(quick.scores.values()) / max(len(quick.scores), 1)
                h.log_metrics({"intermediate_average_accuracy": average}, step=step)
                on_intermediate(plan.label, seed, step, average)

            # --- diagnostics: the curvature at init (level full) before training, ||dW|| every few steps
            probe = diagnostics.start(peft_model, seed) if diagnostics and diagnostics.enabled else None
            with h.step_logger() as steps:
                def on_step(s, loss, lr):
                    steps.log(s, train_loss=loss, lr=lr, **(probe.on_step(s) if probe else {}))

                trained = train(peft_model, examples, collate, settings, progress=progress, description=name,
                                on_step=on_step,
                                checkpoint_every=intermediate_every if on_intermediate else None,
                                on_checkpoint=checkpoint if on_intermediate else None)
                for step, norm in trained.grad_norms:
                    steps.log(step, grad_norm=norm)
            result.loss_curve = trained.losses
            result.train_seconds = trained.train_seconds
            result.seconds_per_step = trained.seconds_per_step
            result.tokens_per_second = trained.tokens_per_second
            result.peak_memory_mb = trained.peak_memory_mb
            result.grad_norm_median, result.clipped_fraction = grad_norm_summary(trained)
            h.log_metrics({"train_seconds": trained.train_seconds, "seconds_per_step": trained.seconds_per_step,
                           "tokens_per_second": trained.tokens_per_second, "peak_memory_mb": trained.peak_memory_mb,
                           "final_train_loss": trained.final_loss, "clipped_fraction": trained.clipped_fraction})
            if probe:  # --- diagnostics: dW, intruders, forgetting, convergence (before the adapter is deleted)
                h.log_metrics(diagnostics.finish(probe, peft_model, method=plan.label, spec_method=spec.method,
                                                 seed=seed, train_result=trained), step=trained.steps)
            log(f"{name}: evaluating ...")
            evaluation = hevaluate.evaluate(peft_model, tokenizer, **eval_kwargs)
            result.scores, result.correct = _leaf_scores(evaluation), _correctness(evaluation)
            _log_evaluation(h, evaluation, run_dir / "samples" / f"{name}.jsonl")
            adapter_dir = save_adapter(peft_model, run_dir / "adapters" / name)
            h.log_artifacts(adapter_dir, "adapter")
        log(f"{name}: " + _score_line(result.scores) + f" ({result.train_seconds:.0f} s training)")
    except NonFiniteLoss as err:
        if diagnostics:
            diagnostics.record_failure(plan.label, seed)
        result.error = str(err)
        log(f"{name}: FAILED: {err}")
    except (KeyboardInterrupt, UserError, Pruned):
        raise
    except Exception as err:  # noqa: BLE001 (a crash in one method must not lose the others)
        if data_parallel and trained is None:
            raise
        result.error = f"{type(err).__name__}: {err}"
        if diagnostics:
            diagnostics.record_failure(plan.label, seed)
        traceback.print_exc()
        log(f"{name}: FAILED: {result.error}; going on with the other methods")
    finally:
        del peft_model
        gc.collect()
    return result


def task_data_checksums(tasks: Sequence[str], data_dir: Path, prompt_format: str, split: str = "test") -> dict[str, str]:
    """SHA-256 of each evaluated task's documents in ``split``: its data file(s), or the generated split.

    A validation split of an LLM-Adapters task also depends on the training set it is cut from
    (``validation_data``), whose checksum is added.

    Also checks the task names (an unknown task is a one-line UserError listing the known ones) and
    reads every data file as the task will (missing, not UTF-8, malformed: one line now, not after
    the base model's evaluation has started).
    """
    from harness import evaluate as hevaluate
    from harness.data import TEST_SETS, TRAIN_SETS, data_file, generate
    from harness.data.records import TEST_KEYS, read_records

    manager = hevaluate.task_manager(data_dir, prompt_format, split)
    checksums: dict[str, str] = {}

    def visit(name: str) -> None:
        entry = manager.task_index.get(name)
        if entry is None:
            return
        cfg = entry.cfg
        if "group" in cfg:
            for sub in cfg.get("task", []):
                visit(sub if isinstance(sub, str) else sub.get("task", ""))
            return
        meta = cfg.get("metadata") or {}
        if meta.get("generator"):
            records = generate(meta["generator"], split=split, seed=int(meta.get("seed", 1234)))
            checksums[name] = records_checksum(records)
        elif meta.get("dataset") in TEST_SETS or meta.get("file"):
            paths = [meta.get("file") or TEST_SETS[meta["dataset"]]]
            if split == "validation" and meta.get("validation_data") in TRAIN_SETS:
                paths.append(TRAIN_SETS[meta["validation_data"]])
            digest = hashlib.sha256()
            for i, relative in enumerate(paths):
                path = Path(relative) if Path(relative).is_absolute() else data_file(relative, data_dir)
                if i == 0:
                    read_records(path, TEST_KEYS)  # what the task's loader does: a bad file fails here, in one line
                digest.update(path.read_bytes())
            checksums[name] = digest.hexdigest()

    for name in hevaluate.expand_tasks(list(tasks), manager, data_dir):
        visit(name)
    return checksums


def _leaf_scores(evaluation) -> dict[str, float]:
    """Primary scores of the evaluated tasks themselves; group aggregates stay in MLflow only, so the
    average over tasks does not count a group's items twice."""
    return {task: score for task, score in evaluation.scores.items() if task in evaluation.samples}


def _correctness(evaluation) -> dict[str, dict[int, float]]:
    """Per task, each test item's 0/1 verdict keyed by document id (for the paired bootstrap)."""
    return {task: {s.doc_id: float(s.correct) for s in samples} for task, samples in evaluation.samples.items()}


def _log_evaluation(handle, evaluation, samples_path: Path) -> None:
    """Task metrics, the average, and lm-eval's per-item samples as an artifact."""
    metrics = evaluation.flat_metrics()
    leaf = _leaf_scores(evaluation)
    if leaf:
        metrics["average_accuracy"] = sum(leaf.values()) / len(leaf)
    handle.log_metrics(metrics)
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    with open(samples_path, "w") as f:
        for task, samples in evaluation.samples.items():
            for sample in samples:
                f.write(json.dumps({"task": task, **asdict(sample)}, default=str) + "\n")
    handle.log_artifact(samples_path, "samples")


def _score_line(scores: dict) -> str:
    if not scores:
        return "no scores"
    avg = sum(scores.values()) / len(scores)
    return ", ".join(f"{t} {100 * s:.1f}%" for t, s in scores.items()) + f" (average {100 * avg:.1f}%)"


def _collate_for(hdata, tokenizer):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return lambda batch: hdata.collate(batch, pad)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet.configure(verbose=quiet.verbose_requested(argv))
    from harness import distributed

    cfg = config_from_args(argv)
    started = time.perf_counter()
    try:
        outcome = run(cfg)
    except KeyboardInterrupt as err:
        print(f"\n{interruption(err)}: MLflow runs marked KILLED; nothing was written to results/", file=sys.stderr)
        return 130
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
