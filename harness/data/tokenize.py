"""Records -> token ids and labels for causal-LM training, and the padding collator."""

from __future__ import annotations

import torch

from harness.data.prompts import format_prompt
from harness.errors import UserError

IGNORE_INDEX = -100  # label value the loss skips


def build_train_dataset(records: list[dict], tokenizer, prompt_format: str, *, train_on_inputs: bool,
                        cutoff_len: int) -> list[dict]:
    """Tokenise ``prompt + output + EOS`` for each record.

    The prompt and the response are tokenised separately, so the prompt's ids are exactly those
    lm-eval feeds at evaluation. ``train_on_inputs=True`` (upstream LLM-Adapters' default) puts the loss
    on the whole sequence; ``False`` (the harness's default) masks the prompt with -100. As upstream, a
    sequence is cut at ``cutoff_len`` tokens and EOS is appended when there is room. No argument has a
    default here: the run's defaults are :class:`harness.config.RunConfig`'s.
    """
    if cutoff_len < 2:
        raise UserError(f"cutoff_len={cutoff_len} must be at least 2 tokens")
    examples = []
    for record in records:
        prompt_ids = tokenizer(format_prompt(record, prompt_format, tokenizer))["input_ids"]
        response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        input_ids = (prompt_ids + response_ids)[:cutoff_len]
        if len(input_ids) < cutoff_len:
            input_ids.append(tokenizer.eos_token_id)
        labels = list(input_ids)
        if not train_on_inputs:
            masked = min(len(prompt_ids), len(labels))
            labels[:masked] = [IGNORE_INDEX] * masked
        examples.append({"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)})
    return examples


def collate_for(tokenizer):
    """The collator of a run: :func:`collate` with the tokenizer's pad id (its EOS id when it has none)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return lambda batch: collate(batch, pad)


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence: pad ids, -100 labels, zero attention."""
    width = max(len(example["input_ids"]) for example in batch)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([example[key] + [value] * (width - len(example[key])) for example in batch])

    return {"input_ids": pad("input_ids", pad_token_id), "labels": pad("labels", IGNORE_INDEX),
            "attention_mask": pad("attention_mask", 0)}
