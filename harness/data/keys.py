"""What makes two records the same question: the key that the validation split and contamination checks share.

It lives in the data layer (it needs only hashlib) so that harness.data never reaches up to the
contamination check or to evaluation for it; :mod:`harness.contamination` re-exports it.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping


def normalise(text: str) -> str:
    """Lower case, runs of white space collapsed to one space, no space at either end."""
    return " ".join(str(text).lower().split())


def record_key(record: Mapping) -> bytes:
    """A 16-byte hash of a record's normalised instruction and input (the question, not the answer)."""
    text = normalise(record.get("instruction", "")) + "\n" + normalise(record.get("input") or "")
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def record_keys(records: Iterable[Mapping]) -> set[bytes]:
    return {record_key(r) for r in records}
