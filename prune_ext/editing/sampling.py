"""A small top-k sampler with a KV cache, seeded by its own generator.

``transformers``' ``generate`` filters the whole vocabulary and draws from it on every step,
which on a CPU costs more than the model for small models with large vocabularies; drawing from
the top-k logits only gives the same distribution much faster.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["sample_tokens"]


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    prompt_ids: list[int],
    rows: int,
    new_tokens: int,
    *,
    top_k: int,
    seed: int,
    banned: int | None = None,
) -> torch.Tensor:
    """(rows, len(prompt_ids) + new_tokens) token ids: the prompt, then top-k samples at
    temperature 1. ``banned`` (e.g. the EOS id) is never drawn, so every row has full length."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt_ids] * rows, dtype=torch.long, device=device)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=tokens, use_cache=True)
    pieces = [tokens]
    for step in range(new_tokens):
        logits = out.logits[:, -1].float()
        if banned is not None:
            logits[:, banned] = float("-inf")
        values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        choice = torch.multinomial(values.softmax(-1), 1, generator=generator)
        nxt = indices.gather(1, choice)
        pieces.append(nxt)
        if step + 1 < new_tokens:
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: _cache_of(out)})
    return torch.cat(pieces, dim=1)


def _cache_of(output: Any) -> Any:
    """The KV cache of a model output (``cache`` in transformers ≥ 5.2x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
