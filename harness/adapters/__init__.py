"""LoRA-family adapters as real peft adapters: LoRA, MoSLoRA, LinChain, MTLoRA, CondLoRA.

A method is named by a spec string (see :mod:`harness.adapters.spec`), e.g. ``lora``,
``moslora:init=orthogonal``, ``linchain:n=5``, ``linchain:r=8,widths=8-16-8``,
``mtlora:structure=icfm``, ``condlora``.

Where the math lives:

- :mod:`harness.adapters.chain`: MoSLoRA, LinChain and MTLoRA (a middle T between A and B);
- :mod:`harness.adapters.condlora`: CondLoRA (A and B generated from W0 by shared maps);
- :mod:`harness.adapters.peft_layer`: how both plug into peft without a fork;
- :mod:`harness.adapters.api`: build, load, export to plain LoRA, count parameters.
"""

from harness.adapters.api import (
    export_lora,
    expected_parameters,
    get_adapter_model,
    load_adapter_model,
    peft_config_for,
    resolve_spec,
    save_adapter,
    trainable_parameters,
    validate_against_model,
)
from harness.adapters.spec import DEFAULT_TARGETS, INITS, METHODS, STRUCTURES, AdapterSpec, parse_spec

__all__ = [
    "AdapterSpec",
    "DEFAULT_TARGETS",
    "INITS",
    "METHODS",
    "STRUCTURES",
    "export_lora",
    "expected_parameters",
    "get_adapter_model",
    "load_adapter_model",
    "parse_spec",
    "peft_config_for",
    "resolve_spec",
    "save_adapter",
    "trainable_parameters",
    "validate_against_model",
]
