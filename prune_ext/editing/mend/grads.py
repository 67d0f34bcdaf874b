"""The pieces of a MEND edit that touch the language model: token rows, the gradient factors
(u_t, δ_t) of the edit loss at each edited matrix, and a forward pass with low-rank updates added.

* An edit row is ``prompt + target[:-1]``; its loss is the mean negative log-likelihood of the
  target tokens (MEND's ``nll``). A locality row is ``prompt + answer[:-1]``, scored at the
  positions that predict the answer's tokens.
* :func:`gradient_factors` runs the model once with the weights frozen: a forward hook records each
  edited module's input u and adds a zero leaf to its output, whose gradient is δ = ∂loss/∂output.
  Then ∇W loss = Σ_t δ_t u_tᵀ (math layout, out × in), summed over the real tokens of the edit rows
  whose u and δ are both non-zero (MEND's ``nz_mask``).
* :func:`low_rank_edits` adds ``x ↦ out_factor (in_factorᵀ x)`` to each edited module's output, so
  the edited model W + ΔW runs without forming ΔW, and differentiably in the factors (training).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models import get_module, weight_is_transposed
from ..tokens import continuation_ids, pad_right

__all__ = [
    "BlockStart",
    "GradientResult",
    "Row",
    "RowBatch",
    "edited_shape",
    "gradient_factors",
    "low_rank_edits",
    "make_row",
    "mean_nll",
    "row_logprobs",
    "start_at",
]


@dataclass(frozen=True)
class Row:
    """Token ids of one row and the target ids predicted from position ``first`` on."""

    ids: tuple[int, ...]
    targets: tuple[int, ...]
    first: int


def make_row(tokenizer: Any, prompt: str, target: str) -> Row:
    """``prompt + " " + target`` as a row whose last len(target) predictions are scored."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    target_ids = continuation_ids(tokenizer, prompt, target)
    return Row(tuple(prompt_ids + target_ids[:-1]), tuple(target_ids), len(prompt_ids) - 1)


class RowBatch:
    """Right-padded rows and the (row, position, token) index of every scored target token."""

    def __init__(self, rows: Sequence[Row], pad: int, device: torch.device) -> None:
        self.rows = list(rows)
        self.input_ids, self.mask = pad_right([r.ids for r in rows], pad, device)
        owner, pos, tok = [], [], []
        for i, row in enumerate(rows):
            for t, token in enumerate(row.targets):
                owner.append(i)
                pos.append(row.first + t)
                tok.append(token)
        self.tgt_row = torch.tensor(owner, dtype=torch.long, device=device)
        self.tgt_pos = torch.tensor(pos, dtype=torch.long, device=device)
        self.tgt_ids = torch.tensor(tok, dtype=torch.long, device=device)
        self.n_targets = torch.tensor([len(r.targets) for r in rows], dtype=torch.float32, device=device)

    def __len__(self) -> int:
        return len(self.rows)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).to(torch.float32)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def row_logprobs(model: nn.Module, batch: RowBatch, start: BlockStart | None = None) -> torch.Tensor:
    """Log-distributions (n_targets, vocab) at every scored position of ``batch`` (one forward
    pass; from ``start`` on, if given)."""
    with start_at(start):
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.mask, use_cache=False)
    picked = hidden.last_hidden_state[batch.tgt_row, batch.tgt_pos]
    return _logits(model, picked).log_softmax(-1)


def mean_nll(batch: RowBatch, log_probs: torch.Tensor) -> torch.Tensor:
    """Per row: mean negative log-likelihood of its target tokens."""
    picked = log_probs.gather(1, batch.tgt_ids[:, None]).squeeze(1)
    sums = torch.zeros(len(batch), device=picked.device, dtype=picked.dtype).index_add(0, batch.tgt_row, picked)
    return -sums / batch.n_targets


def edited_shape(model: nn.Module, name: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of module ``name``'s weight, whatever its stored layout."""
    module = get_module(model, name)
    rows, cols = module.weight.shape
    return (rows, cols) if weight_is_transposed(module) else (cols, rows)


def _main(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_main(output: Any, new: torch.Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


@dataclass
class BlockStart:
    """The input of block ``first`` of ``blocks`` for every row of a batch: a later pass over the
    same batch that only changes blocks ``first`` and above can start there (:func:`start_at`)."""

    blocks: nn.ModuleList
    first: int
    hidden: torch.Tensor
    returns_tuple: bool


class _Passthrough(nn.Module):
    """Stands in for a skipped block: returns its input hidden states unchanged."""

    def __init__(self, returns_tuple: bool) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if self.returns_tuple else hidden_states


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def start_at(start: BlockStart | None) -> Iterator[None]:
    """Skip the blocks below ``start.first`` and feed ``start.hidden`` to block ``first`` (exact:
    those blocks are unchanged, so their output is what was recorded). ``None``: a plain pass."""
    if start is None:
        yield
        return
    blocks, first = start.blocks, start.first
    saved = [blocks[i] for i in range(first)]

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (start.hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": start.hidden}

    handle = blocks[first].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(first):
            blocks[i] = _Passthrough(start.returns_tuple)
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block
        handle.remove()


@dataclass
class GradientResult:
    """What :func:`gradient_factors` returns."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (u (T, in), δ (T, out))
    loss: torch.Tensor  # the edit loss before the edit (detached)
    log_probs: torch.Tensor  # log-distributions at every scored position of the batch (detached)
    start: BlockStart | None  # the input of the first edited block, if asked for


def gradient_factors(
    model: nn.Module,
    modules: Sequence[str],
    batch: RowBatch,
    n_edit: int | None = None,
    *,
    blocks: nn.ModuleList | None = None,
    first_block: int | None = None,
) -> GradientResult:
    """The gradient factors of the edit loss at each module of ``modules``, in one forward pass.

    The loss is the mean over the first ``n_edit`` rows of ``batch`` (default: all) of each row's
    mean target NLL; the other rows ride along and only their log-distributions are wanted. The
    model's parameters must not require grad (use :func:`~prune_ext.editing.models.editing_mode`).
    With ``blocks`` and ``first_block`` the input of ``blocks[first_block]`` is kept as well, so that
    later passes over the same batch can start there (:func:`start_at`).

    ``factors`` hold, per module, u and δ (float32 or wider, detached) at the real tokens of the
    edit rows where both are non-zero: ∇W loss = Σ_t δ_t u_tᵀ (math layout, out × in).
    """
    n_edit = len(batch) if n_edit is None else n_edit
    inputs: dict[str, torch.Tensor] = {}
    leaves: dict[str, torch.Tensor] = {}
    recorded: dict[str, Any] = {}

    def hook_for(name: str):
        def hook(_m: nn.Module, args: Any, output: Any) -> Any:
            inputs[name] = args[0].detach()
            main = _main(output)
            leaf = torch.zeros_like(main, requires_grad=True)
            leaves[name] = leaf
            return _replace_main(output, main + leaf)

        return hook

    def record_input(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        recorded["hidden"] = _hidden_arg(args, kwargs).detach()

    def record_output(_m: nn.Module, _args: Any, output: Any) -> None:
        recorded["tuple"] = isinstance(output, tuple)

    with ExitStack() as stack, torch.enable_grad():
        for name in modules:
            handle = get_module(model, name).register_forward_hook(hook_for(name))
            stack.callback(handle.remove)
        if blocks is not None and first_block is not None:
            h1 = blocks[first_block].register_forward_pre_hook(record_input, with_kwargs=True)
            h2 = blocks[0].register_forward_hook(record_output)
            stack.callback(h1.remove)
            stack.callback(h2.remove)
        log_probs = row_logprobs(model, batch)
    missing = [n for n in modules if n not in leaves]
    if missing:
        raise RuntimeError(f"MEND: modules {missing} did not run in the forward pass")
    loss = mean_nll(batch, log_probs)[:n_edit].mean()
    grads = torch.autograd.grad(loss, [leaves[n] for n in modules], allow_unused=True)
    real = batch.mask[:n_edit].reshape(-1).bool()
    factors = {}
    for name, grad in zip(modules, grads):
        u = inputs[name][:n_edit]
        delta = torch.zeros_like(leaves[name][:n_edit]) if grad is None else grad[:n_edit]
        wide = torch.promote_types(u.dtype, torch.float32)  # float32, or float64 for a float64 model
        u = u.reshape(-1, u.shape[-1])[real].to(wide)
        delta = delta.reshape(-1, delta.shape[-1])[real].to(wide)
        keep = (u != 0).any(-1) & (delta != 0).any(-1)
        factors[name] = (u[keep], delta[keep])
    start = None
    if "hidden" in recorded:
        start = BlockStart(blocks, first_block, recorded["hidden"], recorded.get("tuple", False))
    return GradientResult(factors, loss.detach(), log_probs.detach(), start)


@contextmanager
def low_rank_edits(model: nn.Module, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Run ``model`` as if each module's weight were W + out_factor @ in_factorᵀ (math layout).

    ``updates`` maps a module name to ``(out_factor (out × r), in_factor (in × r))``; the
    addition ``(x @ in_factor) @ out_factorᵀ`` keeps the factors' autograd graph.
    """

    def hook_for(out_f: torch.Tensor, in_f: torch.Tensor):
        def hook(_m: nn.Module, args: Any, output: Any) -> Any:
            main = _main(output)
            x = args[0]
            add = (x.to(in_f.dtype) @ in_f) @ out_f.T
            return _replace_main(output, main + add.to(main.dtype))

        return hook

    with ExitStack() as stack:
        for name, (out_f, in_f) in updates.items():
            handle = get_module(model, name).register_forward_hook(hook_for(out_f, in_f))
            stack.callback(handle.remove)
        yield
