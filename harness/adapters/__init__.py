"""LoRA-family adapters as real peft adapters: LoRA, MoSLoRA, LinChain, MTLoRA, CondLoRA.

A method is named by a spec string (see :mod:`harness.adapters.spec`), e.g. ``lora``,
``moslora:init=orthogonal``, ``linchain:n=5``, ``linchain:r=8,widths=8-16-8``,
``mtlora:structure=icfm``, ``condlora``, ``moslora:freeze_middle=true``,
``lora:match=linchain:r=8,widths=8-16-8``.

Where the math lives:

- :mod:`harness.adapters.spec`: the one description of a method (names, options, defaults,
  the middle-product table); imports no torch;
- :mod:`harness.adapters.chain`: MoSLoRA, LinChain and MTLoRA (a middle T between A and B);
- :mod:`harness.adapters.condlora`: CondLoRA (A and B generated from W0 by shared maps);
- :mod:`harness.adapters.peft_layer`: how both plug into peft without a fork;
- :mod:`harness.adapters.api`: build, load, export to plain LoRA, count parameters.

The functions of :mod:`~harness.adapters.api` are imported on first use, so that
``harness.adapters.spec`` (and the configuration that reads it) loads without torch or peft.
"""

from harness.adapters.spec import DEFAULT_TARGETS, INITS, METHODS, STRUCTURES, AdapterSpec, parse_spec

_API = (
    "AdapterFolder",
    "check_adapter_fits",
    "export_lora",
    "is_affine",
    "expected_parameters",
    "fresh_adapter_model",
    "get_adapter_model",
    "load_adapter_model",
    "read_adapter_folder",
    "peft_config_for",
    "resolve_match",
    "resolve_spec",
    "save_adapter",
    "trainable_parameters",
    "validate_against_model",
)

__all__ = ["AdapterSpec", "DEFAULT_TARGETS", "INITS", "METHODS", "STRUCTURES", "parse_spec", *_API]


def __getattr__(name: str):
    if name in _API:
        from harness.adapters import api  # deferred: api loads torch (see above)

        return getattr(api, name)
    raise AttributeError(f"module 'harness.adapters' has no attribute {name!r}")
