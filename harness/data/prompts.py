"""Prompt formats shared by training and evaluation, so a record reads the same in both.

- ``alpaca``: the LLM-Adapters instruction template (the papers' setting). Upstream's training
  and evaluation templates differ only in indentation whitespace; both are normalised to this one.
- ``chat``: the record's instruction (and input) as one user message rendered by the
  tokenizer's own chat template, with the generation prompt; the response follows.
"""

from __future__ import annotations

from harness.errors import UserError

PROMPT_FORMATS = ("alpaca", "chat")

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def user_message(record: dict) -> str:
    """The request as a user would type it: the instruction, then the input when there is one."""
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


def format_prompt(record: dict, prompt_format: str = "alpaca", tokenizer=None) -> str:
    """The text the model sees before its response.

    For ``chat`` without a tokenizer this is the bare user message: lm-eval renders it with the
    chat template itself (``apply_chat_template=True``), exactly as training does with one.
    """
    if prompt_format == "alpaca":
        return (ALPACA_WITH_INPUT if record.get("input") else ALPACA).format(**{"input": "", **record})
    if prompt_format == "chat":
        message = user_message(record)
        if tokenizer is None:
            return message
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    raise UserError(f"unknown prompt format {prompt_format!r} (one of {', '.join(PROMPT_FORMATS)})")
