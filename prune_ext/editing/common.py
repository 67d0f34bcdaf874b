"""What ROME and MEMIT share: context prefixes, subject keys, and the value (v* / z) optimisation.

Value optimisation (ROME §3.1 step 2, MEMIT eq. 16): a vector δ is added to the output of one
module at the subject's last token, and Adam minimises

    NLL(target | prefix + prompt)  averaged over the context prefixes
    + kl_factor · KL(p_δ(· | "{subject} is a") ‖ p_0(· | "{subject} is a"))   (at the subject)
    + v_weight_decay · ‖δ‖ / ‖v₀‖²

with ‖δ‖ clamped to ``clamp_norm_factor · ‖v₀‖`` after each step, where v₀ is the unedited output
on the bare prompt. Several requests are optimised together (each with its own δ and its own Adam
state, so the result equals optimising them one by one) to share forward passes.

Requests are optimised in groups of bounded size, sorted by the length of what each step recomputes.
A request stops when its loss falls below ``loss_stop`` and, with ``mpes`` (ENCORE's most-probable
early stopping), as soon as its new target is the argmax next token at every target position
(teacher-forced) in every context prefix, counted ``mpes_patience`` times. The rows of the
requests that go on are then picked out of the running batch (and of its key/value cache), so a
shrinking active set costs no new prefix pass.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import add_to_output, capture, stop_after
from .hparams import ValueHyperParams
from .models import editing_mode, get_module
from .requests import EditRequest
from .sampling import _cache_of, sample_tokens
from .tokens import continuation_ids, encode_with_span, pad_id, pad_right

__all__ = ["ValueResult", "generate_prefixes", "optimize_values", "subject_vectors"]

_PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")
_KL_TEMPLATE = "{} is a"
_ROWS_PER_FORWARD = 64
_VALUE_ROWS = 192  # rows (prefixes + KL row per request) optimised together: ~2.5 GB of activations on SmolLM2


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_prefixes(model: nn.Module, tokenizer: Any, lengths: Sequence[tuple[int, int]], seed: int = 0) -> list[str]:
    """``[""]`` plus ``count`` sampled texts of about ``tokens`` tokens per ``(tokens, count)``.

    Each text ends with ``". "`` so that the prompt starts a new sentence after it. Texts are
    sampled with top-k 5 from the starts "The", "Therefore", "Because", "I", "You" (as in the
    ROME/MEMIT code), seeded, so an editor's prefixes are reproducible.
    """
    prefixes = [""]
    eos = getattr(tokenizer, "eos_token_id", None)
    with editing_mode(model):
        for length, count in lengths:
            per_start = [count // len(_PREFIX_STARTS)] * len(_PREFIX_STARTS)
            for i in range(count % len(_PREFIX_STARTS)):
                per_start[i] += 1
            for start, n in zip(_PREFIX_STARTS, per_start):
                if n == 0:
                    continue
                out = sample_tokens(
                    model,
                    list(tokenizer(start)["input_ids"]),
                    n,
                    max(1, length - 1),
                    top_k=5,
                    seed=seed * 7919 + length * 31 + zlib.crc32(start.encode()),
                    banned=eos if isinstance(eos, int) else None,
                )
                for text in tokenizer.batch_decode(out.tolist(), skip_special_tokens=True):
                    text = " ".join(text.replace("{", " ").replace("}", " ").split())
                    prefixes.append(text + ". ")
    return prefixes


def _with_prefix(request: EditRequest, prefix: str) -> tuple[str, int, int]:
    start, end = request.subject_span
    return prefix + request.prompt, len(prefix) + start, len(prefix) + end


@torch.no_grad()
def subject_vectors(
    model: nn.Module,
    tokenizer: Any,
    module_name: str,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    *,
    output: bool = False,
    groups: Sequence[int] | None = None,
) -> torch.Tensor:
    """(n, d) float32: the module's input (or output) at each subject's last token, averaged
    over ``prefix + prompt`` for all prefixes — uniformly (ROME's ``compute_u``), or, with
    ``groups`` (sizes of consecutive prefix groups summing to ``len(prefixes)``), within each group
    and then across groups (MEMIT's ``compute_ks``: with one group of prefixes the bare prompt
    weighs 1/2)."""
    if groups is not None and sum(groups) != len(prefixes):
        raise ValueError(f"prefix groups {list(groups)} do not add up to {len(prefixes)} prefixes")
    module = get_module(model, module_name)
    pad = pad_id(tokenizer)
    if groups is None:
        per_prefix = [1.0 / len(prefixes)] * len(prefixes)
    else:  # 1 / (group size · number of groups) for each prefix of a group
        per_prefix = [1.0 / (size * len(groups)) for size in groups for _ in range(size)]
    rows = []
    for r, request in enumerate(requests):
        for prefix, weight in zip(prefixes, per_prefix):
            enc = encode_with_span(tokenizer, *_with_prefix(request, prefix))
            rows.append((r, enc, weight))
    sums: torch.Tensor | None = None
    with editing_mode(model):
        for lo in range(0, len(rows), _ROWS_PER_FORWARD):
            chunk = rows[lo : lo + _ROWS_PER_FORWARD]
            input_ids, mask = pad_right([enc.ids for _, enc, _ in chunk], pad, _device(model))
            got: list[torch.Tensor] = []
            with capture(module, got.append, output=output), stop_after(module):
                model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            picked = got[0][torch.arange(len(chunk)), torch.tensor([enc.span_last for _, enc, _ in chunk])]
            owner = torch.tensor([r for r, _, _ in chunk], device=picked.device)
            weights = torch.tensor([w for _, _, w in chunk], dtype=torch.float64, device=picked.device)
            if sums is None:
                sums = torch.zeros(len(requests), picked.shape[-1], dtype=torch.float64, device=picked.device)
            sums.index_add_(0, owner, picked.to(torch.float64) * weights[:, None])
    assert sums is not None
    return sums.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# value optimisation


@dataclass
class _Problem:
    """The rows one request contributes to a forward pass."""

    seqs: list[list[int]]  # rewriting rows (prefix + prompt + target[:-1]), then the KL row
    lookup: list[int]  # subject's last token per row
    target_ids: list[int]
    first_target_pos: list[int]  # per rewriting row: position predicting target_ids[0]

    @property
    def n_rewrite(self) -> int:
        return len(self.first_target_pos)


def _problem(tokenizer: Any, request: EditRequest, prefixes: Sequence[str]) -> _Problem:
    target_ids = continuation_ids(tokenizer, request.prompt, request.target_new)
    seqs, lookup, first = [], [], []
    for prefix in prefixes:
        enc = encode_with_span(tokenizer, *_with_prefix(request, prefix))
        seqs.append(enc.ids + target_ids[:-1])
        lookup.append(enc.span_last)
        first.append(len(enc.ids) - 1)
    kl_text = _KL_TEMPLATE.format(request.subject)
    kl = encode_with_span(tokenizer, kl_text, 0, len(request.subject))
    seqs.append(kl.ids)
    lookup.append(kl.span_last)
    return _Problem(seqs, lookup, target_ids, first)


@dataclass
class ValueResult:
    """Per request: v₀ (unedited output at the subject, bare prompt), δ, final NLL, steps taken."""

    init: torch.Tensor  # (n, d) float32
    delta: torch.Tensor  # (n, d) float32
    nll: list[float]
    steps: list[int]

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta


def _logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).to(torch.float32)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class _Batch:
    """The rows of the active problems, split at each row's subject (its last token).

    δ enters at the subject's last token and attention is causal, so everything before it is the
    same at every optimisation step: that part (``prefix_ids``) runs once and is kept as a key/value
    cache; each step runs only the tokens from the subject's last token on (``suffix_ids``, ~5 per
    row instead of ~20). Rows are left-padded so that every subject's last token sits in the first
    suffix column; positions are counted over real tokens only, so results equal a plain right-padded
    forward pass.
    """

    def __init__(self, problems: Sequence[_Problem], pad: int, device: torch.device, split: int | None = None) -> None:
        seqs, lookup, owner, tgt_rows, tgt_pos, tgt_ids, tgt_owner, kl_rows, bare = ([] for _ in range(9))
        self.row_ranges: list[range] = []
        for j, prob in enumerate(problems):
            base = len(seqs)
            self.row_ranges.append(range(base, base + len(prob.seqs)))
            bare.append(base)  # prefixes[0] == "": the bare prompt
            seqs.extend(prob.seqs)
            lookup.extend(prob.lookup)
            owner.extend([j] * len(prob.seqs))
            for i, first in enumerate(prob.first_target_pos):
                for t, tok in enumerate(prob.target_ids):
                    tgt_rows.append(base + i)
                    tgt_pos.append(first + t - prob.lookup[i])  # in suffix columns
                    tgt_ids.append(tok)
                    tgt_owner.append(j)
            kl_rows.append(base + prob.n_rewrite)
        split = max(lookup) if split is None else split  # a subset keeps its parent's split
        if split < max(lookup):
            raise ValueError(f"split {split} is left of a subject ({max(lookup)})")
        width = max(len(s) - at for s, at in zip(seqs, lookup))
        self.prefix_ids = torch.full((len(seqs), split), pad, dtype=torch.long)
        self.suffix_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        self.mask = torch.zeros((len(seqs), split + width), dtype=torch.long)
        for row, (seq, at) in enumerate(zip(seqs, lookup)):
            self.prefix_ids[row, split - at :] = torch.tensor(seq[:at], dtype=torch.long)
            self.suffix_ids[row, : len(seq) - at] = torch.tensor(seq[at:], dtype=torch.long)
            self.mask[row, split - at : split + len(seq) - at] = 1
        self.positions = (self.mask.cumsum(1) - 1).clamp_min(0)
        self.prefix_ids, self.suffix_ids, self.mask, self.positions = (
            x.to(device) for x in (self.prefix_ids, self.suffix_ids, self.mask, self.positions)
        )
        self.split = split

        def t(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        self.rows = torch.arange(len(seqs), device=device)
        self.owner = t(owner)
        self.tgt_rows, self.tgt_pos, self.tgt_ids, self.tgt_owner = (
            t(tgt_rows),
            t(tgt_pos),
            t(tgt_ids),
            t(tgt_owner),
        )
        self.kl_rows = t(kl_rows)
        # per problem: rewriting rows × target length, to turn summed log-probs into means
        self.nll_norm = torch.tensor(
            [p.n_rewrite * len(p.target_ids) for p in problems], dtype=torch.float32, device=device
        )
        self.bare_rows = t(bare)
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def subset(self, keep: Sequence[int], problems: Sequence[_Problem], pad: int) -> _Batch:
        """The batch of ``problems[keep]`` (``problems`` are this batch's), reusing this batch's
        prefix cache rows: the same split, so the same left-padded prefixes and positions."""
        device = self.prefix_ids.device
        child = _Batch([problems[j] for j in keep], pad, device, split=self.split)
        if self.cache is not None:
            rows = torch.tensor([r for j in keep for r in self.row_ranges[j]], dtype=torch.long, device=device)
            child.cache = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cache]
        return child

    @torch.no_grad()
    def run_prefix(self, model: nn.Module) -> None:
        """Run the part before every subject once and keep its keys and values."""
        if self.split == 0:
            return
        out = model.base_model(
            input_ids=self.prefix_ids,
            attention_mask=self.mask[:, : self.split],
            position_ids=self.positions[:, : self.split],
            use_cache=True,
        )
        self.cache = [(layer.keys, layer.values) for layer in _cache_of(out).layers]


def _cache_keyword(model: nn.Module) -> str:
    """The keyword a forward pass takes its KV cache by: ``cache`` in newer transformers 5.x,
    ``past_key_values`` in older ones (5.0 … 5.1x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward(
    model: nn.Module, module: nn.Module, batch: _Batch, deltas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of the suffix columns with ``deltas[owner]`` added to the module's output
    at each row's subject (suffix column 0), and the module's unmodified output there."""
    from transformers import DynamicCache

    seen: list[torch.Tensor] = []

    def make_delta(out: torch.Tensor) -> torch.Tensor:
        seen.append(out[:, 0].detach().to(deltas.device))  # the module may sit on another device
        add = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        rows = batch.rows.to(out.device)
        return add.index_put((rows, torch.zeros_like(rows)), deltas[batch.owner].to(out.device))

    # a fresh cache each step: a forward pass appends to the cache it is given
    kwargs = {_cache_keyword(model.base_model): DynamicCache(batch.cache, config=model.config),
              "use_cache": True} if batch.cache else {}
    with add_to_output(module, make_delta):
        hidden = model.base_model(
            input_ids=batch.suffix_ids,
            attention_mask=batch.mask,
            position_ids=batch.positions[:, batch.split :],
            **kwargs,
        )
    return hidden.last_hidden_state, seen[0]


def _target_nll_and_kl_logp(
    model: nn.Module, batch: _Batch, hidden: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per problem: mean NLL of the target tokens over its rewriting rows, the log-distribution
    after the subject in its KL row, and whether every target token is the argmax (MPES)."""
    log_probs = _logits(model, hidden[batch.tgt_rows, batch.tgt_pos]).log_softmax(-1)
    picked = log_probs.gather(1, batch.tgt_ids[:, None]).squeeze(1)
    summed = torch.zeros(n, device=hidden.device).index_add(0, batch.tgt_owner, picked)
    kl_logp = _logits(model, hidden[batch.kl_rows, 0]).log_softmax(-1)
    with torch.no_grad():
        missed = (log_probs.argmax(-1) != batch.tgt_ids).to(torch.float32)
        top = torch.zeros(n, device=hidden.device).index_add(0, batch.tgt_owner, missed) == 0
    return -summed / batch.nll_norm, kl_logp, top


def optimize_values(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    module_name: str,
    prefixes: Sequence[str],
    hparams: ValueHyperParams,
    *,
    max_rows: int = _VALUE_ROWS,
) -> ValueResult:
    """Optimise one δ per request on the output of ``module_name`` (see the module docstring).

    A request stops (keeping its current δ) once its loss is below ``hparams.loss_stop``, as
    in the authors' code, or, with ``hparams.mpes``, once its target has been the most probable
    continuation everywhere ``hparams.mpes_patience`` times; the others go on sharing the forward
    passes. ``steps[i]`` is the number of Adam steps request i took.

    The requests are optimised in groups of at most ``max_rows`` rows (each request's δ, loss and
    Adam state are its own, so grouping changes nothing but memory and padding): backward through a
    batch of 100 MEMIT requests at once holds ~10 GB of activations on SmolLM2. Requests are grouped
    by the width of their optimised suffix, which cuts the padded tokens by 1.6× on CounterFact.
    """
    device = _device(model)
    module = get_module(model, module_name)
    problems = [_problem(tokenizer, r, prefixes) for r in requests]
    n, pad = len(problems), pad_id(tokenizer)
    init: list[torch.Tensor] = [torch.empty(0)] * n
    deltas: list[torch.Tensor] = [torch.empty(0)] * n
    nll_final, steps = [float("nan")] * n, [0] * n
    with editing_mode(model):
        for group in _groups(problems, max_rows):
            out = _optimize_group(model, module, [problems[i] for i in group], hparams, pad, device)
            for j, i in enumerate(group):
                init[i], deltas[i], nll_final[i], steps[i] = out[0][j], out[1][j], out[2][j], out[3][j]
    return ValueResult(torch.stack(init), torch.stack(deltas), nll_final, steps)


def _suffix_width(problem: _Problem) -> int:
    return max(len(seq) - at for seq, at in zip(problem.seqs, problem.lookup))


def _groups(problems: Sequence[_Problem], max_rows: int) -> list[list[int]]:
    """Indices of ``problems`` in groups of at most ``max_rows`` rows (at least one problem each),
    ordered by suffix width so that each group pads little."""
    order = sorted(range(len(problems)), key=lambda i: (_suffix_width(problems[i]), i))
    groups: list[list[int]] = []
    rows = 0
    for i in order:
        size = len(problems[i].seqs)
        if groups and rows + size <= max_rows:
            groups[-1].append(i)
            rows += size
        else:
            groups.append([i])
            rows = size
    return groups


def _optimize_group(
    model: nn.Module,
    module: nn.Module,
    problems: Sequence[_Problem],
    hparams: ValueHyperParams,
    pad: int,
    device: torch.device,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float], list[int]]:
    """The optimisation loop for one group of problems sharing forward passes: (v₀, δ, NLL, steps)."""
    n = len(problems)
    deltas = [torch.zeros(model.config.hidden_size, device=device, requires_grad=True) for _ in range(n)]
    optims = [torch.optim.Adam([d], lr=hparams.v_lr) for d in deltas]
    init: list[torch.Tensor] = []
    kl_init: list[torch.Tensor] = []
    nll_final, steps, top_hits = [float("nan")] * n, [0] * n, [0] * n
    mpes, patience = bool(hparams.mpes), int(hparams.mpes_patience)
    active = list(range(n))
    batch = _Batch(problems, pad, device)
    batch.run_prefix(model)  # once: a shrinking batch picks its rows out of this cache
    for step in range(hparams.v_num_grad_steps):
        hidden, out = _forward(model, module, batch, torch.stack([deltas[i] for i in active]))
        nll, kl_logp, top = _target_nll_and_kl_logp(model, batch, hidden, len(active))
        if step == 0:  # δ = 0: the unedited value and next-token distribution
            init = list(out[batch.bare_rows].to(torch.float32))
            kl_init = list(kl_logp.detach())
        total, still = torch.zeros((), device=device), []
        top_list = top.tolist()
        for j, i in enumerate(active):
            kl = F.kl_div(kl_init[i], kl_logp[j], log_target=True, reduction="sum")
            decay = hparams.v_weight_decay * deltas[i].norm() / init[i].norm() ** 2
            loss = nll[j] + hparams.kl_factor * kl + decay
            nll_final[i], steps[i] = float(nll[j].detach()), step
            top_hits[i] += int(top_list[j])
            done = loss.item() < hparams.loss_stop or (mpes and top_hits[i] >= patience)
            if not done and step < hparams.v_num_grad_steps - 1:
                total, still = total + loss, [*still, i]
        if not still:
            break
        total.backward()
        for i in still:
            optims[i].step()
            optims[i].zero_grad()
            _clamp(deltas[i], hparams.clamp_norm_factor * init[i].norm())
        if still != active:
            position = {i: j for j, i in enumerate(active)}
            batch = batch.subset([position[i] for i in still], [problems[i] for i in active], pad)
            active = still
    return init, [d.detach() for d in deltas], nll_final, steps


@torch.no_grad()
def _clamp(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    norm = delta.norm()
    if norm > max_norm:
        delta.mul_(max_norm / norm)
