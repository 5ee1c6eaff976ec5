"""Forgetting: how much worse at general prose training made the model (mean per-token loss, after minus before)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch

FORGETTING_SEQUENCES = 16
FORGETTING_TOKENS = 128


def general_text(max_chars: int = 200_000) -> str:
    """Fixed general English prose that needs no network: the prose paragraphs of CPython's ``pydoc_data``.

    ``pydoc_data.topics`` ships with every CPython (it is what ``help("if")`` prints): the Python Language
    Reference's sections as plain text. Grammar rules, code examples (indented), headings and short lines
    are dropped; paragraphs come in the topics' sorted order, so the text is the same on every machine with
    the same Python version (diagnostics.md records its SHA-256). It is expository technical English, a
    different domain from the arithmetic the adapters learn.
    """
    from pydoc_data.topics import topics

    paragraphs: list[str] = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.strip("\n").splitlines()
            if not lines or any(line.startswith(" ") or not line.strip() for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if "::=" in text or len(text) < 200 or set(lines[-1].strip()) <= set("*=-"):
                continue
            paragraphs.append(text)
            if sum(len(p) + 2 for p in paragraphs) >= max_chars:
                return "\n\n".join(paragraphs)
    return "\n\n".join(paragraphs)


@dataclass
class GeneralTextSample:
    """``n`` sequences of ``length`` tokens of :func:`general_text`, and where they came from."""

    input_ids: torch.Tensor
    source: str
    sha256: str

    def describe(self) -> str:
        n, length = self.input_ids.shape
        return f"{n} sequences x {length} tokens of {self.source} (text SHA-256 {self.sha256[:12]})"


def general_text_sample(tokenizer, n_sequences: int = FORGETTING_SEQUENCES,
                        seq_len: int = FORGETTING_TOKENS) -> GeneralTextSample:
    """The forgetting sample: consecutive ``seq_len``-token windows of :func:`general_text`, no padding."""
    import sys

    text = general_text(max_chars=n_sequences * seq_len * 8)  # a token is well under 8 characters of prose
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # no "longer than the model" note
    n = min(n_sequences, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"the general-text sample has only {len(ids)} tokens, fewer than {seq_len}")
    windows = torch.tensor(ids[:n * seq_len]).view(n, seq_len)
    used = tokenizer.decode(windows.reshape(-1).tolist())
    source = f"CPython {sys.version.split()[0]} pydoc_data.topics (Python Language Reference prose)"
    return GeneralTextSample(windows, source, hashlib.sha256(used.encode()).hexdigest())


def mean_token_loss(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean per-token cross-entropy of next-token prediction over equal-length sequences, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    try:
        with torch.no_grad():
            for chunk in torch.split(input_ids, batch_size):
                chunk = chunk.to(device)
                losses.append(float(model(input_ids=chunk, labels=chunk).loss) * chunk.shape[0])
    finally:
        model.train(was_training)
    return sum(losses) / input_ids.shape[0]
