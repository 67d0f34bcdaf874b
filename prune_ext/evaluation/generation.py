"""Model-agnostic helpers shared by the evaluators: teacher-forced scoring and greedy generation.

Everything here works on any causal LM that takes ``input_ids`` and ``attention_mask`` and returns
logits (a tensor, or an object with ``.logits``), so tests can use tiny hand-written models.
Hugging Face models with ``generate`` get cached greedy decoding; other models get a plain loop.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

__all__ = [
    "ContinuationScore",
    "eval_mode",
    "generate_greedy",
    "model_device",
    "pad_token_id",
    "score_continuations",
]


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` for the duration, restoring the training flag after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, falling back to EOS, then 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


@dataclass
class ContinuationScore:
    """Teacher-forced score of ``target`` after ``context``.

    ``logprobs[i]`` is log P(target[i] | context, target[:i]); ``argmax[i]`` is the model's top
    token at that position.
    """

    target: list[int]
    logprobs: list[float]
    argmax: list[int]

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs)

    @property
    def sum_logprob(self) -> float:
        return sum(self.logprobs)

    @property
    def token_accuracy(self) -> float:
        return sum(int(a == t) for a, t in zip(self.argmax, self.target)) / len(self.target)

    def agreement(self, expected: Sequence[int]) -> float:
        """Fraction of positions whose argmax equals ``expected`` (e.g. an unedited model's argmax)."""
        if len(expected) != len(self.argmax):
            raise ValueError(f"expected {len(self.argmax)} tokens, got {len(expected)}")
        return sum(int(a == e) for a, e in zip(self.argmax, expected)) / len(expected)


def score_continuations(
    model: torch.nn.Module,
    items: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "scoring",
) -> list[ContinuationScore]:
    """Teacher-forced log-probs and argmax of each ``(context_ids, target_ids)`` pair, batched.

    Rows are right-padded (so positions need no adjustment) and sorted by length to limit padding;
    items with the same model input (same context and, for single-token targets, nothing else)
    share one row. Results come back in input order. ``batch_size`` counts rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for ctx, tgt in items:
        if len(ctx) == 0 or len(tgt) == 0:
            raise ValueError("every context and target needs at least one token")
    device = model_device(model)
    # Items whose model input is identical (same context, and targets that differ only in their
    # last token, e.g. single-token answers) share one row.
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, tgt) in enumerate(items):
        rows.setdefault(tuple(ctx) + tuple(tgt)[:-1], []).append(i)
    seqs = sorted(rows, key=len)
    results: list[ContinuationScore | None] = [None] * len(items)
    batches = [seqs[s : s + batch_size] for s in range(0, len(seqs), batch_size)]
    with eval_mode(model):
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, s in enumerate(batch):
                ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
                mask[r, : len(s)] = 1
            logits = _logits(model(input_ids=ids.to(device), attention_mask=mask.to(device)))
            for r, s in enumerate(batch):
                for i in rows[s]:
                    ctx, tgt = items[i]
                    start = len(ctx) - 1
                    logp = torch.log_softmax(logits[r, start : start + len(tgt)].float(), dim=-1)
                    tgt_t = torch.tensor(list(tgt), dtype=torch.long, device=logp.device)
                    results[i] = ContinuationScore(
                        target=list(tgt),
                        logprobs=logp.gather(1, tgt_t[:, None])[:, 0].tolist(),
                        argmax=logp.argmax(dim=-1).tolist(),
                    )
    return results  # type: ignore[return-value]


def _body(text: str, skip: re.Pattern | None) -> str:
    """``text`` without its leading whitespace and, if ``skip`` matches there, without that too."""
    text = text.lstrip()
    if skip is not None:
        m = skip.match(text)
        if m:
            text = text[m.end() :].lstrip()
    return text


def _stopped(text: str, stop: Sequence[str], skip: re.Pattern | None = None) -> bool:
    body = _body(text, skip)
    return any(s in body for s in stop)


def _cut(text: str, stop: Sequence[str], skip: re.Pattern | None = None) -> str:
    """Text up to the first stop string after the leading whitespace (and ``skip`` prefix)."""
    body = _body(text, skip)
    cut = min((body.find(s) for s in stop if s in body), default=-1)
    return body if cut < 0 else body[:cut]


def generate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    max_input_tokens: int | None = None,
    stop: Sequence[str] = (),
    skip_prefix: str | None = None,
    progress: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens removed), batched with left padding.

    Prompts longer than ``max_input_tokens`` keep their last tokens. Decoding of a row stops at
    EOS or once one of ``stop`` appears after the row's leading whitespace and after a leading
    match of the regex ``skip_prefix`` (e.g. an ``Answer:`` label); the returned text is cut
    before that stop string, with the leading whitespace and the skipped prefix removed. With no
    ``stop`` the full decoded continuation is returned unstripped.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad = pad_token_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    skip = re.compile(skip_prefix, re.IGNORECASE) if skip_prefix else None
    encoded = []
    for p in prompts:
        ids = tokenizer(p).input_ids
        if max_input_tokens is not None and len(ids) > max_input_tokens:
            ids = ids[-max_input_tokens:]
        encoded.append(ids)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    out: list[str] = [""] * len(prompts)
    device = model_device(model)
    use_hf = hasattr(model, "generate") and hasattr(model, "generation_config")
    with eval_mode(model):
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                n = len(encoded[i])
                ids[r, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
                mask[r, width - n :] = 1
            ids, mask = ids.to(device), mask.to(device)
            if use_hf:
                new = _hf_generate(model, tokenizer, ids, mask, max_new_tokens, pad, eos, stop, skip)
            else:
                new = _plain_generate(model, tokenizer, ids, mask, max_new_tokens, eos, stop, skip)
            for r, i in enumerate(batch):
                toks = new[r][: new[r].index(eos)] if eos in new[r] else new[r]
                text = tokenizer.decode(toks, skip_special_tokens=True)
                out[i] = _cut(text, stop, skip) if stop else text
    return out


def _hf_generate(model, tokenizer, ids, mask, max_new_tokens, pad, eos, stop, skip) -> list[list[int]]:
    from transformers import StoppingCriteria, StoppingCriteriaList

    start = ids.shape[1]

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [
                _stopped(tokenizer.decode(row[start:], skip_special_tokens=True), stop, skip)
                for row in input_ids
            ]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    kwargs = {}
    if stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Stop()])
    gen = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos,
        **kwargs,
    )
    return [row[start:].tolist() for row in gen]


def _plain_generate(model, tokenizer, ids, mask, max_new_tokens, eos, stop, skip) -> list[list[int]]:
    """Greedy loop without a cache, for models that have no ``generate``.

    Left padding shifts positions, so ``position_ids`` (counted over real tokens) are passed when
    the model's ``forward`` accepts them.
    """
    try:
        takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_positions = False
    new: list[list[int]] = [[] for _ in range(ids.shape[0])]
    done = [False] * ids.shape[0]
    for _ in range(max_new_tokens):
        kwargs = {}
        if takes_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = _logits(model(input_ids=ids, attention_mask=mask, **kwargs))
        nxt = logits[:, -1].argmax(dim=-1)
        for r, t in enumerate(nxt.tolist()):
            if not done[r]:
                new[r].append(t)
                if t == eos or (
                    stop and _stopped(tokenizer.decode(new[r], skip_special_tokens=True), stop, skip)
                ):
                    done[r] = True
        if all(done):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return new
