"""Export a saved adapter: a plain peft LoRA folder, or with ``--merged`` a full model with the update merged in.

``python -m harness.export results/<run>/adapters/linchain-3-seed0 out/linchain --model embedded``

The folder a run saves is already a plain LoRA at its top level (see
:func:`harness.adapters.save_adapter`); this command writes a copy of it computed afresh from the
method's factored form, checked against the base model, and says which ``--max-lora-rank`` vLLM needs.
Every refusal is one line, exit 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import quiet
from harness.adapters.spec import MOVES_W0, parse_spec
from harness.errors import UserError, cli_entry

# vLLM accepts only these values of --max-lora-rank, and serves adapters of r up to the value given.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

DESCRIPTION = """\
Export an adapter that harness.run saved (results/<run>/adapters/<label>), or any plain peft LoRA folder.

Without --merged, OUT is a plain peft LoRA (adapter_config.json and adapter_model.safetensors: the
method's exact update as B' A' with the same r and alpha), which PeftModel.from_pretrained, lm-eval
(--model hf --model_args pretrained=M,peft=OUT) and vLLM (--enable-lora --lora-modules name=OUT) load.
The command prints the --max-lora-rank vLLM needs; an r above every value vLLM accepts is a warning
(peft and lm-eval still read the folder), or an error with --vllm.

With --merged, OUT is a full model (safetensors weights and the tokenizer) with the update merged
into the base weights, loadable by AutoModelForCausalLM.from_pretrained and lm-eval's
--model_args pretrained=OUT.

An adapter trained with bias=true is affine, not a LoRA: it cannot be exported either way (load it
with harness.adapters.load_adapter_model). OUT must not exist yet.
"""


def vllm_rank(r: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that serves rank ``r``; None when r is above them all."""
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= r), None)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m harness.export", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", metavar="ADAPTER", help="a folder saved by harness.run, or a plain LoRA folder")
    parser.add_argument("out", metavar="OUT", help="the folder to write (must not exist)")
    parser.add_argument("--merged", action="store_true", help="write a full model with the adapter merged in")
    parser.add_argument("--model", default=None,
                        help="the base model the adapter was trained on (default: the one its config names; "
                             "tiny-random and embedded are the harness's names)")
    parser.add_argument("--vllm", action="store_true",
                        help="refuse (exit 2) an adapter whose r is above every --max-lora-rank vLLM accepts")
    return parser.parse_args(argv)


def _quiet() -> None:
    """The libraries' chatter off the console (harness.quiet), and transformers' weight-loading bar with it."""
    quiet.configure()
    if not quiet.is_verbose():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _model_name(args, config: dict) -> str:
    name = args.model or config.get("base_model_name_or_path")
    if not name:
        raise UserError(f"the adapter at {args.adapter} does not name its base model: pass --model")
    return name


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    from harness.adapters.api import read_adapter_folder  # deferred: loads torch, after _quiet()

    folder = read_adapter_folder(args.adapter)
    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} already exists: choose a new folder (nothing was written)")
    config = folder.config()
    spec = folder.spec
    if spec and parse_spec(spec).bias:
        action = "merged" if args.merged else "exported as a plain LoRA"
        raise UserError(f"an adapter trained with bias=true cannot be {action}: its chain is affine, so the update "
                        "is not a rank-r LoRA (load it with harness.adapters.load_adapter_model)")
    # PiSSA and OLoRA export through peft's conversion, which doubles the rank (harness.adapters.export_lora).
    doubled = 2 if str(config.get("init_lora_weights")).lower().startswith(MOVES_W0) else 1
    r, alpha = int(config["r"]) * doubled, config.get("lora_alpha")
    alpha = alpha * doubled if alpha is not None else alpha
    rank = vllm_rank(r)
    if rank is None and not args.merged:
        message = (f"r={r} is above every --max-lora-rank vLLM accepts ({', '.join(map(str, VLLM_MAX_LORA_RANKS))}): "
                   "vLLM cannot serve this adapter")
        if args.vllm:
            raise UserError(message + " (nothing was written)")
        print(f"warning: {message}; peft and lm-eval read it", file=sys.stderr)
    name = _model_name(args, config)

    # deferred: these load torch, after _quiet()
    from harness.adapters.api import _write_atomically, check_adapter_fits, export_lora, load_adapter_model
    from harness.models import load_model

    model, tokenizer = load_model(name)
    check_adapter_fits(model, folder.path)
    peft_model = load_adapter_model(model, folder.path)
    if args.merged:
        merged = peft_model.merge_and_unload()
        _write_atomically(out, lambda f: (merged.save_pretrained(str(f), safe_serialization=True),
                                          tokenizer.save_pretrained(str(f))))
        print(f"wrote {out}: {name} with the adapter merged in (load it as a model: "
              f"lm-eval --model hf --model_args pretrained={out})")
    else:
        export_lora(peft_model, out)
        vllm = f"vLLM: --enable-lora --max-lora-rank {rank}" if rank else "vLLM cannot serve it"
        print(f"wrote {out}: a plain LoRA, r={r}, alpha={alpha}; {vllm}; "
              f"lm-eval: --model hf --model_args pretrained=<{name}>,peft={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
