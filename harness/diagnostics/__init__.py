"""Mechanism diagnostics: why a method wins or loses, measured in the same run as its scores.

Every method here updates a frozen layer by dW = s B T A of rank at most r, so all of them
reach exactly the same set of updates (each exports to a plain rank-r LoRA); a difference
in score must come from training dynamics. These measurements make the dynamics visible:

- the spectrum of each adapted layer's dW (the exact product, as merging computes it):
  Frobenius norm, top singular values, the entropy effective rank
  exp(-sum_i p_i log p_i) with p_i = s_i / sum_j s_j (Roy and Vetterli 2007), and the
  stable rank ||dW||_F^2 / ||dW||_2^2;
- intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228): how many of the top k
  left singular vectors of W0 + dW have |cosine| below a threshold with every left singular
  vector of W0 (k = 10, threshold 0.5, as peft's ``reduce_intruder_dimension``), from W0's SVD
  (once per layer per run, or per study worker) and dW's factors (:func:`top_left_cosines`), never an SVD of W0 + dW;
- the subspace similarity of a method's dW to LoRA's dW of the same seed: Hu et al. 2021's
  normalised overlap ||U_a^T U_b||_F^2 / k of the top-k left singular vectors (the output
  space; the input spaces start equal, because every method starts from LoRA's A);
- training dynamics: ||dW||_F and the effective rank every 10 steps (:class:`DiagnosticsRecorder`,
  from r x r Gram matrices), the gradient norm of each parameter group when the training loop
  records it, and the steps to 50% and 90% of the final loss reduction;
- curvature (``full`` level only): the largest eigenvalue of the training loss's Hessian with
  respect to the adapter parameters at initialisation, by Lanczos over Hessian-vector products;
- forgetting: mean per-token cross-entropy on a fixed general-text sample, after training
  minus before (the unmodified base model).

:class:`RunDiagnostics` holds what one run shares between methods (the base weights' singular
vectors, the forgetting sample and its base loss, each method's top singular vectors for the
similarity to LoRA) and writes ``diagnostics.csv``, ``diagnostics.md`` (the LinChain paper's
three mechanism claims, each with its evidence and a verdict) and the PNGs. docs/diagnostics.md
explains every number.

The package, by job (docs/diagnostics.md explains every number):

- :mod:`~harness.diagnostics.measures`: the registry of measures (the columns of diagnostics.csv and of
  the table in diagnostics.md) and :class:`Trace`, one run's training dynamics;
- :mod:`~harness.diagnostics.spectra`: the linear algebra of dW, and the recorder during training;
- :mod:`~harness.diagnostics.convergence`: smoothed loss curves and steps to a loss;
- :mod:`~harness.diagnostics.curvature`: Lanczos and the Hessian's lambda_max at initialisation;
- :mod:`~harness.diagnostics.forgetting`: the general-text sample and its loss;
- :mod:`~harness.diagnostics.claims`: the paper's claims, each with a paired Student-t interval over seeds;
- :mod:`~harness.diagnostics.files` and :mod:`~harness.diagnostics.plots`: what is written;
- here: one method and seed's rows (:func:`diagnose`) and a whole run (:class:`RunDiagnostics`).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from harness.reuse import BaseMeasures

from harness.diagnostics.claims import (CLAIMS, Comparison, claim_comparisons, claims_markdown,  # noqa: F401
                                        matched_loss_targets, reference_label)
from harness.diagnostics.convergence import smoothed, steps_to_fraction, steps_to_loss  # noqa: F401
from harness.diagnostics.curvature import (HESSIAN_EXAMPLES, HESSIAN_MAX_ITER, HESSIAN_MICRO_BATCH,  # noqa: F401
                                           HESSIAN_TOL, Eigenvalue, curvature_at_init, hessian_lambda_max,
                                           lanczos_lambda_max)
from harness.diagnostics.files import diagnostics_markdown, write_diagnostics  # noqa: F401
from harness.diagnostics.forgetting import (FORGETTING_SEQUENCES, FORGETTING_TOKENS,  # noqa: F401
                                            GeneralTextSample, general_text, general_text_sample,
                                            mean_token_loss)
from harness.diagnostics.measures import (ALL_LAYERS, COLUMNS, LEVELS, MEASURES, TABLE_COLUMNS,  # noqa: F401
                                          Measure, Trace, complete_row, nan_mean, summary_row)
from harness.diagnostics.plots import (plot_convergence, plot_grad_norms, plot_lr_vs_curvature,  # noqa: F401
                                       plot_spectra)
from harness.diagnostics.spectra import initial_factors
from harness.diagnostics.spectra import (INTRUDER_THRESHOLD, INTRUDER_TOP_K, RECORD_EVERY,  # noqa: F401
                                         SIMILARITY_TOP_K, BaseSpectrum, DiagnosticsRecorder, GradientCapture,
                                         _active_adapter, gradient_alignment,
                                         adapted_layers, base_spectrum, delta_factors, effective_rank,
                                         one_thread, product_svd, singular_values, stable_rank,
                                         subspace_overlap, top_left_cosines, update_intruders,
                                         update_norm_and_rank)


def _fmt_spectrum(s: torch.Tensor) -> str:
    return " ".join(f"{float(x):.4g}" for x in s)


def moves_w0(peft_model, adapter: str) -> bool:
    """Whether the adapter took its initial s B0 A0 out of W0 (PiSSA, OLoRA): its base layers hold the residual."""
    return any(initial_factors(layer, adapter) is not None for layer in adapted_layers(peft_model).values())


def original_weight(layer, adapter: str, base_layer=None) -> torch.Tensor:
    """W0 of an adapted layer, as stored (Conv1D: transposed): ``base_layer``'s weight where given (the unmodified
    base model's layer), else the adapted layer's base weight, plus the initial s B0 A0 that PiSSA and OLoRA
    took out of it."""
    if base_layer is not None:
        return base_layer.weight.detach()
    weight = layer.get_base_layer().weight.detach()
    initial = initial_factors(layer, adapter)
    if initial is None:
        return weight
    b0, a0 = initial
    moved = layer.scaling[adapter] * (b0.to(torch.float32) @ a0.to(torch.float32))
    return (weight.to(torch.float32) + (moved.T if getattr(layer, "fan_in_fan_out", False) else moved)).to(weight.dtype)


def layer_rows(peft_model, base_spectra: dict[str, BaseSpectrum] | None = None,
               reference_vectors: Mapping[str, torch.Tensor] | None = None,
               vectors: dict[str, torch.Tensor] | None = None, base_model=None) -> list[dict]:
    """One row per adapted layer: shape, delta_norm, effective_rank, stable_rank, singular_values, intruders,
    similarity_to_lora (when ``reference_vectors``, the ``vectors`` LoRA's rows of the same seed filled, is given).

    ``base_spectra`` caches W0's SVD by layer name across methods (they share W0): filled on first use. Given
    ``vectors``, it is filled with each layer's top left singular vectors of dW (for the similarity to LoRA).
    Everything comes from the update's factors b a = dW: its spectrum from an r x r core, the intruders from
    :func:`top_left_cosines`; no d_out x d_in matrix is decomposed, only W0 once. W0 is read from
    ``base_model`` (the unmodified base) where given, else rebuilt from the adapted layer
    (:func:`original_weight`).
    """
    adapter = _active_adapter(peft_model)
    base_spectra = {} if base_spectra is None else base_spectra
    rows = []
    with torch.no_grad(), one_thread():
        for name, layer in adapted_layers(peft_model).items():
            b, a = delta_factors(layer, adapter)
            left, s = product_svd(b, a)
            top = left[:, :SIMILARITY_TOP_K]
            if vectors is not None:
                vectors[name] = top
            w0 = original_weight(layer, adapter, base_model.get_submodule(name.removeprefix("base_model.model."))
                                 if base_model is not None else None)
            if name not in base_spectra:
                base_spectra[name] = base_spectrum(w0)
            row = {"layer": name, "shape": f"{b.shape[0]}x{a.shape[1]}", "delta_norm": float(s.pow(2).sum().sqrt()),
                   "effective_rank": effective_rank(s), "stable_rank": stable_rank(s),
                   "singular_values": _fmt_spectrum(s),
                   "intruders": update_intruders(base_spectra[name], w0, b, a)}
            if reference_vectors is not None and name in reference_vectors:
                row["similarity_to_lora"] = subspace_overlap(top, reference_vectors[name])
            rows.append(row)
    return rows


def diagnose(peft_model, *, method: str, seed: int, level: str = "basic", spec_method: str | None = None,
             losses: Sequence[tuple[int, float]] = (), lambda_max: float = float("nan"),
             forgetting_sample: GeneralTextSample | None = None, base_loss: float | None = None,
             base_spectra: dict[str, BaseSpectrum] | None = None,
             reference_vectors: Mapping[str, torch.Tensor] | None = None,
             vectors: dict[str, torch.Tensor] | None = None, base_model=None) -> list[dict]:
    """Diagnostics rows of one trained adapter: one per adapted layer, then the layer ``all`` row.

    ``level`` ``none`` gives no rows; ``basic`` and ``full`` the same rows (``full`` differs by
    ``lambda_max``, which must be measured before training: pass :func:`curvature_at_init`'s value).
    ``losses`` is the training curve (steps_to_50, steps_to_90, final_loss); with ``forgetting_sample`` the
    row's ``forgetting`` is its loss after training minus ``base_loss`` (measured with the adapter disabled
    when not given). ``base_spectra``, ``vectors`` and ``base_model``: as in :func:`layer_rows`.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown diagnostics level {level!r}; one of {', '.join(LEVELS)}")
    if level == "none":
        return []
    rows = layer_rows(peft_model, base_spectra, reference_vectors, vectors, base_model=base_model)
    total = summary_row(rows)
    total.update({"lambda_max": lambda_max, "steps_to_50": steps_to_fraction(losses, 0.5),
                  "steps_to_90": steps_to_fraction(losses, 0.9),
                  "final_loss": smoothed(losses)[-1][1] if losses else float("nan")})
    if forgetting_sample is not None:
        if base_loss is None:
            if moves_w0(peft_model, _active_adapter(peft_model)):
                raise ValueError(f"{method}: with the adapter disabled this model is W0 less the adapter's initial "
                                 "part (PiSSA, OLoRA), not the base model: pass base_loss measured on the base model")
            with peft_model.disable_adapter():
                base_loss = mean_token_loss(peft_model, forgetting_sample.input_ids)
        total["forgetting"] = mean_token_loss(peft_model, forgetting_sample.input_ids) - base_loss
    common = {"method": method, "spec_method": spec_method or method.split(":", 1)[0].split("-", 1)[0],
              "seed": seed}
    return [complete_row({**common, **row}) for row in [*rows, total]]


def trace_of(method: str, seed: int, train_result, recorder: DiagnosticsRecorder | None = None,
             spec_method: str | None = None) -> Trace:
    """A :class:`Trace` from a :class:`harness.train.TrainResult` (its gradient-norm fields are read if present)."""
    return Trace(method, spec_method or method, seed, list(train_result.losses),
                 list(getattr(train_result, "grad_norms", None) or []),
                 list(getattr(train_result, "group_grad_norms", None) or []),
                 list(recorder.delta_norms) if recorder else [], list(recorder.effective_ranks) if recorder else [],
                 list(recorder.movements) if recorder else [], list(recorder.alignments) if recorder else [])


@dataclass
class MethodProbe:
    """What :meth:`RunDiagnostics.start` prepared for one method: the step recorder and the curvature at init."""

    recorder: DiagnosticsRecorder
    curvature: Eigenvalue | None = None
    problem: str | None = None  # why a measurement could not be made, for diagnostics.md

    def on_step(self, step: int, loss: float | None = None, lr: float | None = None) -> dict[str, float]:
        return self.recorder.on_step(step)


class RunDiagnostics:
    """The diagnostics of one run: :meth:`start` before each method trains, :meth:`finish` after, :meth:`write` last.

    Holds what methods share: W0's SVD (:class:`BaseSpectrum`, one per layer per run or study worker), the
    forgetting sample and the base model's loss on it, and each method's top singular vectors for the
    similarity to LoRA.
    """

    def __init__(self, level: str, tokenizer=None, examples: Sequence[dict] = (), collate=None, *,
                 record_every: int = RECORD_EVERY, hessian_examples: int = HESSIAN_EXAMPLES,
                 known_curvature: Mapping[int, Eigenvalue] | None = None, base_model=None,
                 base: BaseMeasures | None = None, step_alignment: bool = True):
        if level not in LEVELS:
            raise ValueError(f"unknown diagnostics level {level!r}; one of {', '.join(LEVELS)}")
        self.level = level
        self.tokenizer, self.examples, self.collate = tokenizer, examples, collate
        self.record_every, self.hessian_examples = record_every, hessian_examples
        # the step-direction cosine (DiagnosticsRecorder.alignments): off under torchrun, where this rank's
        # captured G is its own micro-batches' gradient, not the all-reduced one the optimizer stepped with
        self.step_alignment = step_alignment
        # seed -> lambda_max already measured for this method and seed (a study's earlier trial at another rate):
        # the curvature at initialisation does not depend on the learning rate, so it is not measured again
        self.known_curvature = dict(known_curvature or {})
        self.curvatures: dict[tuple[str, int], Eigenvalue] = {}  # (method, seed) -> lambda_max used in its rows
        self.rows: list[dict] = []
        self.traces: list[Trace] = []
        self.failed: list[tuple[str, int]] = []
        self.problems: list[str] = []
        self.learning_rates: dict[str, float] = {}  # method -> the rate it trained at (harness.run: one, shared)
        # W0's SVD, the forgetting sample and the base model's loss on it: this run's own, or the ones a study
        # worker's trials share (harness.reuse); measured on ``base_model`` itself where given, else with the
        # first method's adapter disabled (which is the base model only where the method leaves W0 as it is)
        self.base_model = base_model
        self.base = base if base is not None else BaseMeasures()
        self._vectors: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    @property
    def enabled(self) -> bool:
        return self.level != "none"

    def start(self, peft_model, seed: int) -> MethodProbe:
        """Before training: the recorder, and at level ``full`` the Hessian's lambda_max at initialisation."""
        probe = MethodProbe(DiagnosticsRecorder(peft_model, self.record_every, alignment=self.step_alignment))
        if self.level == "full" and seed in self.known_curvature:
            probe.curvature = self.known_curvature[seed]
        elif self.level == "full" and self.examples:
            try:
                probe.curvature = curvature_at_init(peft_model, self.examples, self.collate,
                                                    n_examples=self.hessian_examples, seed=seed)
            except Exception as err:  # noqa: BLE001 (a measurement must not cost the method its run)
                traceback.print_exc()
                probe.problem = f"lambda_max not measured: {type(err).__name__}: {err}"
        return probe

    def finish(self, probe: MethodProbe, peft_model, *, method: str, spec_method: str, seed: int,
               train_result, lr: float | None = None) -> dict[str, float]:
        """After training: the rows of this method and seed; returns the ``diag/`` metrics of its ``all`` row.

        Log them at the last step: ``diag/delta_norm`` and ``diag/effective_rank`` are also the recorder's curves.
        ``lr`` is the rate the method trained at; diagnostics.md states it beside the claims.
        A measurement that fails is reported (traceback on stderr, a line in diagnostics.md) and costs the
        method nothing else: its training and evaluation go on.
        """
        if lr is not None:
            self.learning_rates[method] = float(lr)
        if probe.problem:
            self.problems.append(f"{method} seed {seed}: {probe.problem}")
        try:
            return self._measure(probe, peft_model, method, spec_method, seed, train_result)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            self.problems.append(f"{method} seed {seed}: not measured: {type(err).__name__}: {err}")
            return {}

    def _measure(self, probe: MethodProbe, peft_model, method: str, spec_method: str, seed: int,
                 train_result) -> dict[str, float]:
        probe.recorder.close()
        probe.recorder.record(train_result.steps)
        base = self.base
        if self.tokenizer is not None and base.sample is None:
            base.sample = general_text_sample(self.tokenizer)
        if base.sample is not None and base.loss is None:  # every method shares the base model: measure it once
            if self.base_model is not None:
                base.loss = mean_token_loss(self.base_model, base.sample.input_ids)
            else:
                with peft_model.disable_adapter():
                    base.loss = mean_token_loss(peft_model, base.sample.input_ids)
        lambda_max = probe.curvature.value if probe.curvature else float("nan")
        if probe.curvature:
            self.curvatures[(method, seed)] = probe.curvature
        vectors: dict[str, torch.Tensor] = {}
        rows = diagnose(peft_model, method=method, seed=seed, level=self.level, spec_method=spec_method,
                        losses=train_result.losses, lambda_max=lambda_max, forgetting_sample=base.sample,
                        base_loss=base.loss, base_spectra=base.spectra, vectors=vectors,
                        base_model=self.base_model)
        self._vectors[(method, seed)] = vectors
        self.rows.extend(rows)
        self.traces.append(trace_of(method, seed, train_result, probe.recorder, spec_method))
        metrics = {f"diag/{k}": v for k, v in rows[-1].items() if k not in ("method", "spec_method", "seed", "layer")
                   and isinstance(v, (int, float))}
        if probe.curvature:
            metrics.update({"diag/lambda_max_residual": probe.curvature.residual,
                            "diag/lambda_max_iterations": probe.curvature.iterations})
        return metrics

    def record_failure(self, method: str, seed: int) -> None:
        """A run that failed: listed in diagnostics.md, never silently dropped."""
        self.failed.append((method, seed))

    def fill_similarity(self) -> None:
        """similarity_to_lora of every row whose seed has a LoRA run (LoRA may train after the others)."""
        reference = reference_label(self.rows)
        for row_seed in {r["seed"] for r in self.rows}:
            lora = self._vectors.get((reference, row_seed))
            if lora is None:
                continue
            for row in (r for r in self.rows if r["seed"] == row_seed and r["layer"] != ALL_LAYERS):
                row["similarity_to_lora"] = subspace_overlap(self._vectors[(row["method"], row_seed)][row["layer"]],
                                                             lora[row["layer"]])
            for row in (r for r in self.rows if r["seed"] == row_seed and r["layer"] == ALL_LAYERS):
                row["similarity_to_lora"] = nan_mean(r["similarity_to_lora"] for r in self.rows
                                                     if r["seed"] == row_seed and r["method"] == row["method"]
                                                     and r["layer"] != ALL_LAYERS)

    def write(self, run_dir: str | os.PathLike) -> dict[str, Path]:
        """diagnostics.csv, diagnostics.md and the PNGs into ``run_dir``; nothing when the level is ``none``."""
        if not self.enabled:
            return {}
        self.fill_similarity()
        return write_diagnostics(run_dir, self.rows, self.traces, failed=self.failed, level=self.level,
                                 sample=self.base.sample.describe() if self.base.sample else None, problems=self.problems,
                                 learning_rates=self.learning_rates)
