"""``python -m harness.adapters SPEC``: check a method spec and show what it builds on a model.

Example: ``python -m harness.adapters linchain:r=8,widths=8-16-8 --model tiny-random``
"""

from __future__ import annotations

import argparse
import sys

from harness.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.adapters",
        description="Check an adapter spec and show what it builds: the resolved options, the middle matrices "
                    "and the trainable parameters (formula and peft's count).",
        epilog="Spec grammar: METHOD[:KEY=VALUE,...]; methods lora, moslora, linchain, mtlora, condlora. "
               "Examples: lora, moslora:init=orthogonal, linchain:n=5, linchain:r=8,widths=8-16-8, "
               "mtlora:structure=icfm, condlora.",
    )
    parser.add_argument("spec", help="the method spec, e.g. linchain:n=5")
    parser.add_argument("--model", default="tiny-random",
                        help="model to build it on (default tiny-random; smollm2-135m-instruct, a folder or a hub id)")
    parser.add_argument("--rank", type=int, default=16, help="the run's r (a spec's r= wins); default 16")
    parser.add_argument("--alpha", type=float, default=32.0, help="the run's alpha; default 32")
    parser.add_argument("--targets", default=None, help="comma-separated module names; default q,k,v,up,down")
    args = parser.parse_args(argv)

    from harness.adapters import expected_parameters, get_adapter_model, resolve_spec, trainable_parameters
    from harness.models import load_model

    common = {"r": args.rank, "alpha": args.alpha}
    if args.targets:
        common["targets"] = args.targets.split(",")
    spec = resolve_spec(args.spec, **common)  # fails here, before any model work, on a bad spec
    model, _ = load_model(args.model)
    expected = expected_parameters(model, spec)
    peft_model = get_adapter_model(model, spec)
    print(f"method     {spec.name}")
    print(f"spec       {spec.canonical()}")
    if spec.middle_shapes:
        shapes = ", ".join(f"{a}x{b}" for a, b in spec.middle_shapes)
        print(f"middle     T = {spec.middle_product}({shapes}), init {spec.init}")
    print(f"trainable parameters  {trainable_parameters(peft_model):,} (formula {expected:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
