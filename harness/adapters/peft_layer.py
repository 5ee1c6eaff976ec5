"""The peft side: a LoraConfig that records our methods, and a LoRA Linear layer that builds them.

Everything here plugs into peft from outside, with no fork: peft's
``LoraConfig._register_custom_module({nn.Linear: HarnessLinear})`` makes peft build
:class:`HarnessLinear` for every targeted linear layer. ``HarnessLinear`` lets peft
create plain LoRA factors (so A is initialised exactly as in plain LoRA) and then
swaps in the method's factor modules:

- middle methods (MoSLoRA, LinChain, MTLoRA): ``lora_A`` becomes a
  :class:`~harness.adapters.chain.MiddleFactor` (weight = T A);
- CondLoRA: ``lora_A`` and ``lora_B`` become
  :class:`~harness.adapters.condlora.GeneratedFactor` modules reading shared maps.

peft's merge, unmerge and delta-weight code then run unchanged, because they only
ever use ``lora_A.weight``, ``lora_B.weight`` and the modules' forward. The forward is
peft's too, with one change for computed factors: the dtype check that peft does by
reading ``lora_A.weight.dtype`` (which would compute T A, or CondLoRA's A, a second
time in every forward) reads the factor's ``dtype`` instead.

The factored form's config says ``peft_type: "LORA"`` plus ``harness_spec``; plain
``PeftModel.from_pretrained`` would load it as plain LoRA with a random A, which is why
:func:`harness.adapters.save_adapter` stores it as ``harness/harness_config.json`` (a name no peft
client reads) beside the exact plain-LoRA export, and :func:`harness.adapters.load_adapter_model`
reads it back.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from harness.adapters.chain import MiddleFactor
from harness.adapters.condlora import GeneratedFactor, base_weight, new_condlora_maps
from harness.adapters.spec import AdapterSpec, parse_spec
from harness.errors import UserError


@dataclass
class HarnessLoraConfig(LoraConfig):
    """peft's LoraConfig plus the method's spec string; saved in adapter_config.json and parsed again on load.

    The spec is the one description of the method: the layers read shapes, products, inits and options from
    :attr:`spec`, never from fields of their own.
    """

    harness_spec: str = field(default="", metadata={"help": "the canonical spec string this adapter was built from"})

    def __post_init__(self):
        super().__post_init__()
        from transformers.pytorch_utils import Conv1D

        # GPT-2's Conv1D goes through the same layer: peft's Linear handles its transposed weight (fan_in_fan_out).
        self._register_custom_module({nn.Linear: HarnessLinear, Conv1D: HarnessLinear})

    @property
    def spec(self) -> AdapterSpec:
        """The parsed :attr:`harness_spec` (parsed once)."""
        if self.__dict__.get("_spec_text") != self.harness_spec:
            self.__dict__["_spec"] = parse_spec(self.harness_spec)
            self.__dict__["_spec_text"] = self.harness_spec
        return self.__dict__["_spec"]

    @classmethod
    def from_saved(cls, path: str, config_name: str = "adapter_config.json") -> "HarnessLoraConfig":
        """Read the saved config (``config_name`` in ``path``) into this class (peft's own from_pretrained would return a LoraConfig).

        Adapters saved before the spec was the only description load too (their extra fields are ignored),
        except CondLoRA ones: those used the authors' form on square layers and the row-space form on the
        others, which no single ``form`` reproduces.
        """
        saved = json.loads((Path(path) / config_name).read_text())
        names = {f.name for f in fields(cls) if f.init}
        config = cls(**{k: v for k, v in saved.items() if k in names})
        if config.spec.method == "condlora" and "form=" not in config.harness_spec:
            raise UserError(f"the CondLoRA adapter at {path} was saved before CondLoRA used one form for every "
                            "layer (form=rowspace|authors) and cannot be loaded; train it again")
        return config


def refuse_affine(factor, action: str) -> None:
    """One line for a ``bias=true`` adapter asked to become a plain LoRA (merged, or exported)."""
    if isinstance(factor, MiddleFactor) and factor.has_bias:
        raise UserError(f"an adapter trained with bias=true cannot be {action}: its chain is affine, so the update "
                        "is not a rank-r LoRA (B T A plus a constant); load it with harness.adapters."
                        "load_adapter_model instead, or train without bias")


def _init_generator(target_name: str, adapter_name: str) -> torch.Generator:
    """A generator for the method's own matrices, derived from the global seed and the layer's name.

    Drawing them from the global RNG would shift every later layer's A; with a private generator every
    method given the same seed starts from exactly the same A as plain LoRA.
    """
    key = zlib.crc32(f"{adapter_name}/{target_name}".encode())
    return torch.Generator().manual_seed((torch.initial_seed() * 1_000_003 + key) % (2**63))


class HarnessLinear(LoraLinear):
    """peft's LoRA Linear, with the method's factor modules swapped in after peft builds plain A and B."""

    adapter_layer_names = LoraLinear.adapter_layer_names + ("lora_cond",)

    def update_layer(self, adapter_name: str, r: int, lora_alpha, config, **kwargs) -> None:
        if "lora_cond" not in self._modules:  # peft's update_layer already iterates adapter_layer_names
            self.lora_cond = nn.ModuleDict()
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        spec = config.spec if isinstance(config, HarnessLoraConfig) else None
        target_name = kwargs.get("target_name", "")
        generator = _init_generator(target_name, adapter_name)
        if spec is not None and spec.middle is not None:
            plain_a = self.lora_A[adapter_name].weight
            self.lora_A[adapter_name] = MiddleFactor(plain_a, spec, generator)
        elif spec is not None and spec.method == "condlora":
            maps = self._shared_condlora_maps(config, adapter_name, target_name, r, generator)
            base = self.get_base_layer()
            self.lora_A[adapter_name] = GeneratedFactor("A", base, maps, spec.form)
            self.lora_B[adapter_name] = GeneratedFactor("B", base, maps, spec.form)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        """peft's hook after anything that turns adapter gradients on: keep ``freeze_middle`` matrices frozen."""
        super()._freeze_non_trainable_peft_weights(adapter_names)
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        for name, factor in self.lora_A.items():
            if isinstance(factor, MiddleFactor) and (names is None or name in names):
                factor.freeze_middle_()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """peft's merge, refused for a chain with biases: its constant term s B c has no place in W0."""
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            refuse_affine(self.lora_A[name] if name in self.lora_A else None, "merged")
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """peft's LoRA forward, reading a computed factor's dtype instead of computing the factor for it.

        Merged layers, disabled adapters, mixed-adapter batches, peft's own variants and layers with only
        plain factors all go through peft's forward unchanged.
        """
        active = [name for name in self.active_adapters if name in self.lora_A]
        computed = (MiddleFactor, GeneratedFactor)
        if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None
                or any(name in self.lora_variant for name in active)
                or not any(isinstance(self.lora_A[name], computed) for name in active)):
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        for key in VARIANT_KWARG_KEYS:
            kwargs.pop(key, None)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in active:
            lora_A = self.lora_A[name]
            dtype = lora_A.dtype if isinstance(lora_A, computed) else lora_A.weight.dtype
            x = self._cast_input_dtype(x, dtype)
            result = result + self.lora_B[name](lora_A(self.lora_dropout[name](x))) * self.scaling[name]
        return result.to(result_dtype)

    def _shared_condlora_maps(self, config, adapter_name: str, target_name: str, r: int, generator):
        """The (Theta_A, Theta_B) pair for this layer's module type; registered here if this layer is its owner."""
        registry = config.__dict__.setdefault("_condlora_owners", {})
        module_type = target_name.rsplit(".", 1)[-1]
        base = self.get_base_layer()
        d_out, d_in = base_weight(base).shape
        entry = registry.get((adapter_name, module_type))
        # Construction visits layers in module order, so the owner is always the first of its type; meeting the
        # owner's name again means a new model is being built from this config: start afresh.
        if entry is None or entry["owner"] == target_name:
            dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
            maps = new_condlora_maps(r, d_in, d_out, dtype, base.weight.device, generator)
            registry[(adapter_name, module_type)] = {"owner": target_name, "maps": maps, "shape": (d_out, d_in)}
            self.lora_cond[adapter_name] = maps
            return maps
        if entry["shape"] != (d_out, d_in):
            raise ValueError(
                f"CondLoRA shares one map per module type, but {module_type} layers have shapes "
                f"{entry['shape']} ({entry['owner']}) and {(d_out, d_in)} ({target_name})"
            )
        return entry["maps"]
