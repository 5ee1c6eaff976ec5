"""Build, load, export and count adapters: the functions the rest of the harness calls."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from harness.adapters.chain import MiddleFactor
from harness.adapters.spec import INITIAL_FACTORS_ATTR, MOVES_W0, AdapterSpec, parse_spec
from harness.errors import UserError
from harness.fsutil import publish_mode
from harness.models import ARCHITECTURES, architecture_of, refuse_pickled_weights

CONFIG_FILE = "adapter_config.json"


def resolve_spec(spec: str | AdapterSpec, **common) -> AdapterSpec:
    """A parsed spec; ``common`` holds the run's r, alpha, dropout and targets (the spec overrides them)."""
    if isinstance(spec, AdapterSpec):
        return spec
    return parse_spec(spec, **{k: v for k, v in common.items() if v is not None})


# peft's own LoRA variants, each one LoraConfig option: the method name -> (the option, its value).
PEFT_VARIANTS = {"dora": ("use_dora", True), "rslora": ("use_rslora", True), "pissa": ("init_lora_weights", "pissa"),
                 "olora": ("init_lora_weights", "olora")}


def peft_config_for(spec: AdapterSpec, base_model_name: str | None = None, *, fan_in_fan_out: bool = False):
    """The peft config for a spec: peft's own LoraConfig for ``lora`` and peft's variants
    (:data:`PEFT_VARIANTS`), :class:`HarnessLoraConfig` otherwise.

    ``fan_in_fan_out`` is for targets whose weight is stored transposed (GPT-2's ``Conv1D``).
    """
    from peft import LoraConfig

    from harness.adapters.peft_layer import HarnessLoraConfig  # deferred with peft: peft_layer loads it

    if spec.r is None:
        raise ValueError(f"{spec.label}: resolve_match(spec, model) must choose r before a peft config is built")
    if spec.targets is None:
        raise ValueError(f"{spec.label}: resolve_targets(spec, model) must name the targets before a peft config "
                         "is built")
    common = dict(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.targets),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name,
        fan_in_fan_out=fan_in_fan_out,
    )
    if spec.method == "lora":
        return LoraConfig(**common)
    if spec.method in PEFT_VARIANTS:
        option, value = PEFT_VARIANTS[spec.method]
        return LoraConfig(**common, **{option: value})
    return HarnessLoraConfig(**common, harness_spec=spec.canonical())


def get_adapter_model(model: nn.Module, spec: str | AdapterSpec, *, adapter_name: str = "default", **common):
    """Wrap ``model`` (modified in place, as peft does) in a trainable PeftModel for the method ``spec``.

    ``common`` may give ``r``, ``alpha``, ``dropout`` and ``targets``; options in the spec win.
    ``lora:match=...`` gets its rank here, from the model's layer shapes (:func:`resolve_match`).
    Every check that can fail on user input runs before peft touches the model.
    """
    from peft import get_peft_model

    spec = resolve_spec(spec, **common)
    validate_against_model(model, spec)
    spec = resolve_match(spec, model)
    transposed = {_is_conv1d(m) for layers in target_layers(model, spec.targets).values() for _, m in layers}
    config = peft_config_for(spec, getattr(getattr(model, "config", None), "name_or_path", None) or None,
                             fan_in_fan_out=True in transposed)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    if spec.method in MOVES_W0:  # peft's conversion to a plain LoRA needs the initial A and B (export_lora)
        _keep_initial_state(peft_model, adapter_name)
    return peft_model


def fresh_adapter_model(base_model: nn.Module, spec: AdapterSpec, seed: int):
    """A copy of ``base_model`` with the method's adapter, ``base_model`` untouched.

    The generator is seeded with ``seed`` first, so the same seed gives every method the same initial A.
    """
    import copy

    torch.manual_seed(seed)
    return get_adapter_model(copy.deepcopy(base_model), spec)


HARNESS_DIR = "harness"  # the factored form, inside a saved adapter's folder
HARNESS_CONFIG = "harness_config.json"  # its config: not adapter_config.json, so no vanilla peft client reads it
NOT_LORA_README = """# Not a plain LoRA adapter

This adapter was trained with `bias=true`: every matrix of its chain has a bias, so its update is
affine (B T A x plus a constant), not a rank-r LoRA. No plain LoRA reproduces it, so this folder
deliberately has no `adapter_config.json`: `PeftModel.from_pretrained`, lm-eval's `peft=` and vLLM
refuse it instead of loading something else.

Its factored form is in `harness/`; load it with the harness:

    from harness.adapters import load_adapter_model
    model = load_adapter_model(base_model, "<this folder>")
"""


@dataclass(frozen=True)
class AdapterFolder:
    """What a folder holds: its factored (harness) form, its plain LoRA form, or both.

    ``factored`` is the folder with the harness's config and weights (``<saved>/harness``), ``plain`` the
    folder a vanilla peft client loads (a harness save's main folder, or any plain LoRA); either may be None
    (a ``bias=true`` save has no plain form, an external LoRA no factored one). ``legacy`` marks a folder
    saved before the two were split (one adapter_config.json with ``harness_spec``).
    """

    path: Path
    factored: Path | None
    plain: Path | None
    legacy: bool = False

    def config(self) -> dict:
        """The adapter's saved config (the factored one where there is one)."""
        if self.factored is not None:
            return json.loads((self.factored / (CONFIG_FILE if self.legacy else HARNESS_CONFIG)).read_text())
        return json.loads((self.plain / CONFIG_FILE).read_text())

    @property
    def spec(self) -> str | None:
        """The canonical spec of a harness save; None for a plain LoRA from elsewhere."""
        return self.config().get("harness_spec") or None


def read_adapter_folder(path: str | os.PathLike) -> AdapterFolder:
    """Classify an adapter folder; a one-line :class:`UserError` when it is neither a harness save nor a LoRA.

    Accepted: a harness save (its main folder, or the ``harness/`` inside it), a plain peft LoRA folder, and
    a harness save of the old one-folder layout.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"no adapter at {path}: not a folder")
    if (path / HARNESS_CONFIG).is_file():  # the factored folder itself
        path = path.parent if path.name == HARNESS_DIR else path
        factored = path / HARNESS_DIR if (path / HARNESS_DIR / HARNESS_CONFIG).is_file() else path
        plain = path if factored != path and (path / CONFIG_FILE).is_file() else None
        return AdapterFolder(path, factored, plain)
    factored = path / HARNESS_DIR if (path / HARNESS_DIR / HARNESS_CONFIG).is_file() else None
    plain = None
    if (path / CONFIG_FILE).is_file():
        try:
            saved = json.loads((path / CONFIG_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path / CONFIG_FILE} is not valid JSON: {err}") from None
        if not isinstance(saved, dict) or saved.get("peft_type") != "LORA":
            kind = saved.get("peft_type") if isinstance(saved, dict) else None
            raise UserError(f"the adapter at {path} is not a LoRA (peft_type {kind!r}); the harness reads LoRA "
                            "adapters and its own saves only")
        if "harness_spec" in saved and factored is None:
            return AdapterFolder(path, path, None, legacy=True)
        plain = path
    if factored is None and plain is None:
        raise UserError(f"no saved adapter at {path}: neither {CONFIG_FILE} (a LoRA) nor "
                        f"{HARNESS_DIR}/{HARNESS_CONFIG} (a harness save) is there")
    return AdapterFolder(path, factored, plain)


def check_adapter_fits(model: nn.Module, path: str | os.PathLike) -> None:
    """One-line :class:`UserError` unless every layer the saved adapter adapts is a linear layer of ``model``
    with the shapes the adapter was trained on; read from the weight files' headers, before peft loads them."""
    from safetensors import safe_open

    folder = read_adapter_folder(path)
    where = folder.plain or folder.factored
    weights = where / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"the adapter at {folder.path} has no adapter_model.safetensors in {where}")
    modules = dict(model.named_modules())
    with safe_open(str(weights), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    for key, shape in sorted(shapes.items()):
        if ".lora_" not in key:
            continue
        name = key.split(".lora_", 1)[0].removeprefix("base_model.model.")
        module = modules.get(name)
        if module is None or not is_adaptable(module):
            what = "missing from" if module is None else f"a {type(module).__name__} in"
            raise UserError(f"the adapter at {folder.path} adapts {name}, which is {what} the base model: "
                            "pass the model it was trained on (--model)")
        d_out, d_in = layer_shape(module)
        expected = {"lora_A.weight": shape[1:] == (d_in,), "lora_B.weight": shape[:1] == (d_out,)}
        part = key.split(".lora_", 1)[1]
        if folder.plain is not None and not expected.get("lora_" + part, True):
            raise UserError(f"the adapter's {key} has shape {list(shape)}, but the base model's {name} is "
                            f"{d_out}x{d_in}: pass the model it was trained on (--model)")


def load_adapter_model(base_model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default",
                       is_trainable: bool = False, plain: bool = False):
    """Load a saved adapter onto ``base_model``: the method where the folder holds its factored form.

    A harness save loads as its method (MoSLoRA's T, LinChain's chain, CondLoRA's maps, read from
    ``harness/``), a plain LoRA folder as plain LoRA; ``plain=True`` loads a harness save's plain export
    instead. peft alone could not tell the factored form from a LoRA, which is why it lives under its own
    config name; the old one-folder layout (``harness_spec`` in adapter_config.json) still loads here.
    """
    from peft import PeftModel

    from harness.adapters.peft_layer import HarnessLoraConfig  # deferred with peft: peft_layer loads it

    folder = read_adapter_folder(path)
    if plain and folder.plain is None:
        raise UserError(f"the adapter at {folder.path} has no plain LoRA form (it was trained with bias=true)")
    if folder.factored is not None and not plain:
        where, config_name = folder.factored, CONFIG_FILE if folder.legacy else HARNESS_CONFIG
        refuse_pickled_weights(where, "adapter folder")
        saved = json.loads((where / config_name).read_text())
        if saved.get("harness_spec"):
            config = HarnessLoraConfig.from_saved(where, config_name)
        else:  # a plain LoRA trained by the harness: its factored form is a LoRA too
            config = _lora_config(saved)
            config.inference_mode = not is_trainable
    else:
        where, config = folder.plain, None
        refuse_pickled_weights(where, "adapter folder")
    peft_model = PeftModel.from_pretrained(base_model, str(where), adapter_name=adapter_name,
                                           is_trainable=is_trainable, config=config)
    init = where / PISSA_INIT / "adapter_model.safetensors"
    if init.is_file():  # a PiSSA or OLoRA save: peft redid its init on load; keep A0, B0 for export_lora
        from safetensors.torch import load_file

        peft_model.__dict__.setdefault(INITIAL_STATE_ATTR, {})[adapter_name] = load_file(str(init))
        _attach_initial_factors(peft_model, adapter_name)
    return peft_model


def _lora_config(saved: dict):
    """peft's LoraConfig from a saved config dict, keeping only the fields this peft knows."""
    from dataclasses import fields

    from peft import LoraConfig

    names = {f.name for f in fields(LoraConfig) if f.init}
    return LoraConfig(**{k: v for k, v in saved.items() if k in names})


def is_affine(peft_model, adapter_name: str | None = None) -> bool:
    """Whether the adapter has a biased (``bias=true``) chain, so no plain LoRA can reproduce it."""
    adapter = adapter_name or peft_model.active_adapter
    return any(isinstance(f, MiddleFactor) and f.has_bias
               for m in peft_model.modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)
               for name, f in m.lora_A.items() if name == adapter)


def export_lora(peft_model, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write a plain peft LoRA adapter of rank r that is exactly equivalent to ``peft_model``'s adapter.

    Every method's update is B' A' (A' = T A for middle methods, the generated factors for CondLoRA), so
    the export stores A' and B' under peft's own key names with the same r and alpha (rsLoRA keeps
    ``use_rslora``). The result loads with plain ``PeftModel.from_pretrained`` in a process that never
    imports this package. PiSSA goes through peft's own conversion (rank 2r, alpha 2 alpha, on the
    unmodified base). Refused with one line: a ``bias=true`` adapter (its update is affine, not a rank-r
    LoRA) and DoRA (its magnitude vector rescales W0 too).
    """
    return _write_atomically(Path(path), lambda folder: _write_plain_lora(peft_model, folder, adapter_name))


# inside a PiSSA or OLoRA save's harness/: the initial A and B, for peft's conversion (the folder name predates OLoRA
# and stays, so that earlier saves load)
PISSA_INIT = "pissa_init"
INITIAL_STATE_ATTR = "_harness_initial_state"  # on a PiSSA/OLoRA peft model: adapter -> its initial A and B (peft keys)


def _moves_w0(config) -> bool:
    """PiSSA or OLoRA (:data:`MOVES_W0`): an adapter whose initial s B0 A0 was taken out of W0."""
    return str(getattr(config, "init_lora_weights", "")).lower().startswith(MOVES_W0)


def _keep_initial_state(peft_model, adapter_name: str) -> None:
    """Record a fresh PiSSA or OLoRA adapter's initial A and B (in memory): peft converts either to a plain LoRA
    from them."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    peft_model.__dict__.setdefault(INITIAL_STATE_ATTR, {})[adapter_name] = {
        k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    _attach_initial_factors(peft_model, adapter_name)


def _attach_initial_factors(peft_model, adapter_name: str) -> None:
    """Give each PiSSA/OLoRA layer its initial (B0, A0): its base weight is W0 - s B0 A0, so the method's update to
    W0 is s (B A - B0 A0), which the diagnostics measure (:func:`harness.diagnostics.delta_factors`)."""
    from peft.tuners.lora import LoraLayer

    init = peft_model.__dict__[INITIAL_STATE_ATTR][adapter_name]
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            b0, a0 = init[f"{name}.lora_B.weight"], init[f"{name}.lora_A.weight"]
            module.__dict__.setdefault(INITIAL_FACTORS_ATTR, {})[adapter_name] = (b0, a0)


def _initial_state(peft_model, adapter: str) -> dict:
    init = peft_model.__dict__.get(INITIAL_STATE_ATTR, {}).get(adapter)
    if init is None:
        raise UserError(f"PiSSA/OLoRA adapter {adapter!r} has no record of its initial A and B, which peft's conversion to "
                        "a plain LoRA needs: build it with harness.adapters.get_adapter_model or load a harness save")
    return init


def refuse_dora_export(peft_model, adapter: str) -> None:
    """One line for a DoRA adapter asked to become a plain LoRA: its magnitude vector has no place in B A."""
    layer = next((name for name, m in peft_model.named_modules()
                  if adapter in getattr(m, "lora_magnitude_vector", {})), "its layers")
    raise UserError(f"a DoRA adapter cannot be exported as a plain LoRA: {layer.removeprefix('base_model.model.')} "
                    "has a magnitude vector (lora_magnitude_vector) that rescales every output row of W0 + s B A, "
                    "which no B A reproduces; load its own folder with peft (use_dora) or export it --merged")


def _write_w0_moving_as_lora(peft_model, folder: Path, adapter: str) -> None:
    """peft's own conversion of a PiSSA or OLoRA adapter into a LoRA on the unmodified base: rank 2r, [A; A0] and
    [B, -B0] (dW = s (B A - B0 A0), peft's ``path_initial_model_for_weight_conversion``)."""
    from safetensors.torch import save_file

    init = _initial_state(peft_model, adapter)
    with tempfile.TemporaryDirectory() as tmp:
        init_dir = Path(tmp) / PISSA_INIT
        init_dir.mkdir()
        save_file(init, str(init_dir / "adapter_model.safetensors"))  # peft writes its config there itself
        with warnings.catch_warnings():  # peft warns that PiSSA shares the model with the initial adapter it loads
            warnings.filterwarnings("ignore", message="(PiSSA|OLoRA) changes the base weights")
            peft_model.save_pretrained(str(folder), selected_adapters=[adapter],
                                       path_initial_model_for_weight_conversion=str(init_dir))


def _write_plain_lora(peft_model, folder: Path, adapter_name: str | None = None) -> None:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    from harness.adapters.peft_layer import refuse_affine  # deferred with peft: peft_layer loads it

    adapter = adapter_name or peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    if getattr(config, "use_dora", False):
        refuse_dora_export(peft_model, adapter)
    if _moves_w0(config):
        return _write_w0_moving_as_lora(peft_model, folder, adapter)
    state = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                refuse_affine(module.lora_A[adapter], "exported as a plain LoRA")
                state[f"{name}.lora_A.weight"] = module.lora_A[adapter].weight.detach().cpu().contiguous().clone()
                state[f"{name}.lora_B.weight"] = module.lora_B[adapter].weight.detach().cpu().contiguous().clone()
    if not state:
        raise UserError(f"adapter {adapter!r} has no LoRA layers to export")
    plain = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=sorted(config.target_modules) if config.target_modules else None,
        use_rslora=config.use_rslora,
        fan_in_fan_out=config.fan_in_fan_out,
        bias="none",
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
    )
    plain.save_pretrained(str(folder))
    save_file(state, str(folder / "adapter_model.safetensors"))


def save_adapter(peft_model, path: str | os.PathLike) -> Path:
    """Save an adapter as one folder every client reads right, written atomically (no half-written folder).

    The folder itself is the exact plain-LoRA export (:func:`export_lora`): vanilla ``PeftModel.from_pretrained``,
    lm-eval's ``peft=`` and vLLM load it and get the method's update. Two of peft's variants differ: a DoRA
    folder is peft's own DoRA save (peft and lm-eval load it exactly; vLLM refuses DoRA), and a PiSSA
    folder is peft's conversion to a rank-2r LoRA on the unmodified base, with the initial A and B kept in
    ``harness/pissa_init`` so that a reloaded PiSSA adapter exports again. The factored form (T, the chain,
    CondLoRA's maps; what resumes, diagnoses and reloads as the method) is ``harness/``, whose config is
    ``harness_config.json``, a name no peft client looks for. A ``bias=true`` adapter has no plain form: the
    folder then holds only ``harness/`` and a README saying why, so vanilla peft finds no adapter_config.json
    and raises.
    """
    def write(folder: Path) -> None:
        factored = folder / HARNESS_DIR
        config = peft_model.peft_config[peft_model.active_adapter]
        peft_model.save_pretrained(str(factored))
        os.replace(factored / CONFIG_FILE, factored / HARNESS_CONFIG)
        if _moves_w0(config):
            from safetensors.torch import save_file

            (factored / PISSA_INIT).mkdir()
            save_file(_initial_state(peft_model, peft_model.active_adapter),
                      str(factored / PISSA_INIT / "adapter_model.safetensors"))
        if is_affine(peft_model):
            (folder / "README.md").write_text(NOT_LORA_README)
        elif getattr(config, "use_dora", False):  # peft's own DoRA folder: every peft client loads it exactly
            peft_model.save_pretrained(str(folder))
        else:
            _write_plain_lora(peft_model, folder)

    return _write_atomically(Path(path), write)


def _write_atomically(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write(staging)
        publish_mode(staging)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def trainable_parameters(peft_model: nn.Module) -> int:
    """Trainable parameters, each tensor counted once (CondLoRA's shared maps too)."""
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_adaptable(module: nn.Module) -> bool:
    """A layer every method can adapt: ``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of an adaptable layer (a peft LoRA layer too: its base layer's), whatever the storage."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    rows, cols = base.weight.shape
    return (cols, rows) if _is_conv1d(base) else (rows, cols)


def _matches(name: str, target: str) -> bool:
    """peft's rule for a target module name: the module's full name is it or ends in ``.<target>``."""
    return name == target or name.endswith("." + target)


def target_layers(model: nn.Module, targets) -> dict[str, list[tuple[str, nn.Module]]]:
    """For each target name, the modules it names under peft's matching rule (the full name ends in it)."""
    found: dict[str, list[tuple[str, nn.Module]]] = {t: [] for t in targets}
    for name, module in model.named_modules():
        for target in found:
            if _matches(name, target):
                found[target].append((name, module))
    return found


def adaptable_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of the model's adaptable layers (what a one-line error lists)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_adaptable(m)})


def resolve_targets(spec: AdapterSpec, model_or_config) -> AdapterSpec:
    """The spec with ``targets=auto`` (None) replaced by the architecture's defaults (``harness.models.ARCHITECTURES``);
    specs naming their targets are returned unchanged. A match spec's targets are resolved too.

    An architecture the table does not list has no defaults: one line naming its layers.
    """
    match = resolve_targets(spec.match, model_or_config) if spec.match is not None else None
    if spec.targets is not None:
        return spec if match is spec.match else replace(spec, match=match)
    model_type, arch = architecture_of(model_or_config)
    if arch is None:
        layers = adaptable_names(model_or_config) if isinstance(model_or_config, nn.Module) else []
        known = ", ".join(sorted(ARCHITECTURES))
        listed = f"; its linear layers are: {', '.join(layers)}" if layers else ""
        raise UserError(f"no default target modules for model type {model_type!r} (defaults exist for {known}): "
                        f"name them with --targets (or targets= in the spec){listed}")
    return replace(spec, targets=arch.default_targets, match=match)


def validate_against_model(model: nn.Module, spec: AdapterSpec) -> None:
    """Check the spec (and a ``match`` spec) against the model's layers; one-line :class:`UserError` on a mismatch."""
    from peft.tuners.lora import LoraLayer

    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise UserError("the model already carries a LoRA adapter: pass a fresh base model")
    spec = resolve_targets(spec, model)
    if spec.match is not None:
        validate_against_model(model, spec.match)
    found = target_layers(model, spec.targets)
    linear_names = adaptable_names(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for target, layers in found.items():
        if not layers:
            raise UserError(f"target module {target!r} not found in the model ({model_type}); its linear layers are: "
                            f"{', '.join(linear_names)}")
        for name, module in layers:
            if not is_adaptable(module):
                raise UserError(f"target {target!r} matches {name}, a {type(module).__name__}; only linear layers "
                                f"can be adapted: {', '.join(linear_names)}")
    kinds = {_is_conv1d(m) for layers in found.values() for _, m in layers}
    if spec.method == "olora" and True in kinds:
        name = next(n for layers in found.values() for n, m in layers if _is_conv1d(m))
        raise UserError(f"olora cannot adapt {name}, a Conv1D layer: peft's OLoRA initialisation takes the QR "
                        "decomposition of the stored weight, which Conv1D keeps transposed; use pissa or lora")
    if len(kinds) > 1:
        raise UserError(f"targets {'+'.join(spec.targets)} mix nn.Linear and Conv1D layers, which one peft config "
                        "cannot adapt together (fan_in_fan_out differs); target one kind")
    spec = resolve_match(spec, model)
    for target, layers in found.items():
        for name, module in layers:
            d_out, d_in = layer_shape(module)
            if spec.r > min(d_in, d_out):
                raise UserError(f"r={spec.r} is larger than target layer {name} allows "
                                f"(min(d_in, d_out) = {min(d_in, d_out)} for shape {d_out}x{d_in})")
            if spec.form == "authors" and d_out != d_in:
                raise UserError(f"condlora:form=authors needs square layers, but {name} is {d_out}x{d_in}; "
                                "use form=rowspace or target square modules only (e.g. targets=q_proj+o_proj)")
        if spec.method == "condlora":
            shapes = {layer_shape(m) for _, m in layers}
            if len(shapes) > 1:
                raise UserError(f"CondLoRA shares one map per module type, but the {target} layers have different "
                                f"shapes {sorted(shapes)}; target only module types whose layers all match")


def resolve_match(spec: AdapterSpec, model_or_config) -> AdapterSpec:
    """``lora:match=<spec>`` with its rank chosen: the r whose LoRA parameter count is nearest the other spec's.

    LoRA's count is linear in r (r times the sum of d_in + d_out over the adapted layers), so the nearest
    count is at the floor or the ceiling of target / per-rank count; a tie goes to the smaller rank (the
    fewer parameters), and r stays within the layers' min(d_in, d_out). A spec that already names r (a
    canonical string) must name that same rank. Specs without ``match`` are returned unchanged.
    """
    spec = resolve_targets(spec, model_or_config)
    if spec.match is None:
        return spec
    target = expected_parameters(model_or_config, spec.match)
    per_rank = expected_parameters(model_or_config, replace(spec, r=1, match=None))
    largest = _largest_rank(model_or_config, spec.targets)
    candidates = {min(max(r, 1), largest) for r in (target // per_rank, target // per_rank + 1)}
    chosen = min(candidates, key=lambda r: (abs(r * per_rank - target), r))
    if spec.r is not None and spec.r != chosen:
        raise UserError(f"{spec.text or spec.canonical()!r} gives r={spec.r}, but match={spec.match.label} "
                        f"chooses r={chosen} on this model; leave r out of a matched spec")
    return replace(spec, r=chosen)


def _largest_rank(model_or_config, targets) -> int:
    """The largest r every targeted layer allows: min(d_in, d_out) over them."""
    return min(min(shape) for per_type in _target_shapes(model_or_config, targets).values() for shape in per_type)


def expected_parameters(model_or_config, spec: str | AdapterSpec, **common) -> int:
    """Trainable parameters from the method's formula (methods.md), from layer shapes alone.

    The shapes come from a Llama-style model config (hidden, intermediate, heads, KV heads, layers) when
    the model has one, so the count is independent of the module tree peft builds; other architectures
    fall back to the base model's linear-layer shapes.

    Per adapted layer of shape d_out x d_in: LoRA (d_in + d_out) r; the middle methods add their middle
    matrices (MoSLoRA r^2, LinChain sum h_i h_{i-1}, MTLoRA r^2 or 2 r^2) unless ``freeze_middle``, and
    with ``bias`` one bias per chain matrix (sum of h_i, i = 1..n); CondLoRA has r (d_in + d_out) per
    module TYPE. ``lora:match`` counts at the rank :func:`resolve_match` chooses.
    """
    spec = resolve_match(resolve_spec(spec, **common), model_or_config)  # resolves targets=auto too
    shapes = _target_shapes(model_or_config, spec.targets)
    r = spec.r
    if spec.method == "condlora":
        return sum(r * (d_in + d_out) for per_type in shapes.values() for (d_out, d_in) in set(per_type))
    middle = 0 if spec.freeze_middle else sum(a * b + (a if spec.bias else 0) for a, b in spec.middle_shapes)
    return sum((d_in + d_out) * r + middle for per_type in shapes.values() for (d_out, d_in) in per_type)


def _target_shapes(model_or_config, targets) -> dict[str, list[tuple[int, int]]]:
    """Shapes (d_out, d_in) of the targeted layers, per target: from a Llama-style config, else the model's
    layers (a config alone is built on torch's meta device, which allocates nothing)."""
    shapes = _llama_shapes(getattr(model_or_config, "config", model_or_config), targets)
    if shapes is None:
        model = model_or_config
        if not isinstance(model, nn.Module):
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(model_or_config)
        found = target_layers(model, targets)
        shapes = {t: [layer_shape(m) for _, m in layers if is_adaptable(m) or hasattr(m, "get_base_layer")]
                  for t, layers in found.items()}
    missing = [t for t, per_type in shapes.items() if not per_type]
    if missing:
        raise UserError(f"target module {missing[0]!r} not found in the model; name its linear layers in targets")
    return shapes


def _llama_shapes(config, targets) -> dict[str, list[tuple[int, int]]] | None:
    """Shapes (d_out, d_in) of each targeted projection in a Llama-style decoder, from its config alone."""
    needed = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
    if config is None or not all(hasattr(config, k) for k in needed):
        return None
    # Model types whose layers are exactly the Llama projections below (Qwen3's and Gemma 3's head_dim included).
    if getattr(config, "model_type", "llama") not in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "smollm3"):
        return None
    h, inter, heads, layers = (getattr(config, k) for k in needed)
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    per_layer = {
        "q_proj": (heads * head_dim, h), "k_proj": (kv * head_dim, h), "v_proj": (kv * head_dim, h),
        "o_proj": (h, heads * head_dim), "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter),
    }
    if any(t not in per_layer for t in targets):
        return None
    return {t: [per_layer[t]] * layers for t in targets}
