"""``python -m harness.adapters SPEC``: check a method spec and show what it builds on a model.

Example: ``python -m harness.adapters linchain:r=8,widths=8-16-8 --model tiny-random``
"""

from __future__ import annotations

import argparse
import sys

from harness.adapters.spec import COMMON_OPTIONS, METHOD_OPTIONS, OPTION_DEFAULTS
from harness.errors import cli_entry

# What each method option takes, for --help (the names and defaults come from harness.adapters.spec).
OPTION_VALUES = {
    "match": "<spec>, last (LoRA at the rank whose parameter count is nearest that spec's)",
    "init": "kaiming|orthogonal|identity",
    "freeze_middle": "true|false (the middle matrices stay at their init; A and B train)",
    "bias": "true|false (a bias in every chain matrix, as the authors' code; cannot merge or export)",
    "n": "chain length",
    "widths": "r-...-r",
    "structure": "shim|icfm|ctcm|dtsm",
    "form": "rowspace|authors (authors: square layers only)",
}


def options_help() -> str:
    """One line per method: its options, what they take and their defaults."""
    lines = []
    for method, options in METHOD_OPTIONS.items():
        described = [f"{key}={OPTION_VALUES[key]}"
                     + (f" [default {str(OPTION_DEFAULTS[key]).lower()}]" if key in OPTION_DEFAULTS else "")
                     for key in options]
        lines.append(f"  {method}: " + ("; ".join(described) if described else "no options of its own"))
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.adapters",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check an adapter spec and show what it builds: the resolved options, the middle matrices "
                    "and the trainable parameters (formula and peft's count).",
        epilog=f"Spec grammar: METHOD[:KEY=VALUE,...]. Every method takes {', '.join(COMMON_OPTIONS)}; "
               "and its own:\n" + options_help() + "\nExamples: lora, moslora:init=orthogonal, linchain:n=5, "
               "linchain:r=8,widths=8-16-8, mtlora:structure=icfm, moslora:freeze_middle=true, "
               "linchain:bias=true, condlora:form=authors,targets=q_proj+o_proj, "
               "lora:match=linchain:r=8,widths=8-16-8.",
    )
    parser.add_argument("spec", help="the method spec, e.g. linchain:n=5")
    parser.add_argument("--model", default="tiny-random",
                        help="model to build it on (default tiny-random; smollm2-135m-instruct, a folder or a hub id)")
    parser.add_argument("--rank", type=int, default=16, help="the run's r (a spec's r= wins); default 16")
    parser.add_argument("--alpha", type=float, default=32.0, help="the run's alpha; default 32")
    parser.add_argument("--targets", default=None, help="comma-separated module names; default auto (the architecture's q,k,v,up,down: docs/architectures.md)")
    args = parser.parse_args(argv)

    # deferred: these load torch, so --help and argument errors stay fast
    from harness.adapters import expected_parameters, get_adapter_model, resolve_match, resolve_spec
    from harness.adapters import trainable_parameters
    from harness.adapters.api import target_layers
    from harness.models import load_model

    common = {"r": args.rank, "alpha": args.alpha}
    if args.targets:
        common["targets"] = args.targets.split(",")
    spec = resolve_spec(args.spec, **common)  # fails here, before any model work, on a bad spec
    auto = spec.targets is None
    model, _ = load_model(args.model)
    expected = expected_parameters(model, spec)
    peft_model = get_adapter_model(model, spec)
    spec = resolve_match(spec, model)
    print(f"method     {spec.name}")
    print(f"label      {spec.label}")
    print(f"spec       {spec.canonical()}")
    layers = sum(len(found) for found in target_layers(model, spec.targets).values())
    print(f"targets    {', '.join(spec.targets)} ({layers} layers"
          + (", from --targets auto for model type " + repr(model.config.model_type) if auto else "") + ")")
    if spec.middle:
        shapes = ", ".join(f"{a}x{b}" for a, b in spec.middle_shapes)
        print(f"middle     T = {spec.middle.formula} ({spec.middle_product} of {shapes}), init {spec.init}"
              + (", biases" if spec.bias else "") + (", frozen" if spec.freeze_middle else ""))
    if spec.form:
        print(f"form       {spec.form}")
    if spec.match:
        print(f"matches    {spec.match.label}: {expected_parameters(model, spec.match):,} parameters, "
              f"so r = {spec.r}")
    print(f"trainable parameters  {trainable_parameters(peft_model):,} (formula {expected:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
