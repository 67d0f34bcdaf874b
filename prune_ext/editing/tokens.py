"""Tokenisation helpers: subject positions, target continuations, padded batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Encoded", "continuation_ids", "encode_with_span", "pad_id", "pad_right"]


@dataclass(frozen=True)
class Encoded:
    """Token ids of a text and the index of the last token of a marked character span."""

    ids: list[int]
    span_last: int


def _ids(tokenizer: Any, text: str, **kwargs: Any) -> list[int]:
    return list(tokenizer(text, **kwargs)["input_ids"])


def encode_with_span(tokenizer: Any, text: str, start: int, end: int) -> Encoded:
    """Encode ``text`` and find the token holding character ``end - 1`` (the span's last token).

    Uses the fast tokenizer's offsets; falls back to the length of the encoded prefix
    ``text[:end]`` for slow tokenizers.
    """
    if not 0 <= start < end <= len(text):
        raise ValueError(f"bad span ({start}, {end}) for text of length {len(text)}")
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        ids = _ids(tokenizer, text)
        return Encoded(ids, min(len(_ids(tokenizer, text[:end])), len(ids)) - 1)
    ids = list(enc["input_ids"])
    last = end - 1
    for index in range(len(offsets) - 1, -1, -1):
        tok_start, tok_end = offsets[index]
        if tok_end > tok_start and tok_start <= last:
            return Encoded(ids, index)
    raise ValueError(f"cannot locate characters {start}:{end} of {text!r} in its tokens")


def continuation_ids(tokenizer: Any, prompt: str, target: str) -> list[int]:
    """Token ids of ``" " + target`` as it continues ``prompt``.

    Encodes the whole text and keeps what follows the prompt's tokens, so that the target is
    tokenised the way the model would read it after the prompt (no BOS, right merge at the
    boundary); falls back to encoding the target alone.
    """
    text = " " + target.strip()
    prompt_ids = _ids(tokenizer, prompt)
    full_ids = _ids(tokenizer, prompt + text)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return full_ids[len(prompt_ids) :]
    ids = _ids(tokenizer, text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"target {target!r} encodes to no tokens")
    return ids


def pad_id(tokenizer: Any) -> int:
    """The id used for right padding (pad, else eos, else 0); padded positions are masked."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def pad_right(
    seqs: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)``."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return input_ids.to(device), mask.to(device)
