"""Training MEND's editor networks offline (``prune-ext train-mend``).

MEND's objective (``trainer.py`` of the authors' code; the weights of their ``config.yaml``), for
one edit request at a time, the base model frozen:

1. the gradient factors (u_t, δ_t) of the edit loss NLL(target_new | prompt) at each edited matrix;
2. the networks map them to ΔW = −η Σ_t δ̃_t ũ_tᵀ per matrix (normalisation statistics updated);
3. on the edited model W + ΔW: L_edit = mean of NLL(target_new | prompt) and
   NLL(target_new | rephrase) (the generalisation input), and L_loc = KL(p_W ‖ p_{W+ΔW}) on the
   locality prompt, at the positions that predict its answer;
4. L = c_edit · L_edit + c_loc · L_loc (c_edit = 0.1, c_loc = 1), backpropagated to the networks
   and the step sizes η through ΔW (the gradient factors themselves are constants).

The gradients of ``edits_per_step`` edits (MEND's ``accumulate_bs``: 10) are averaged, clipped to
norm 100 (``grad_clip``), and one Adam step is taken on the networks and one on the step sizes η
(``lr_lr``: 1e-4; η starts at ``edit_lr``: 1e-4).

One deliberate difference from MEND's configuration: the networks' Adam learning rate is 1e-4, not
MEND's 1e-6. MEND trains for 10⁵–10⁶ edits with early stopping; the 60-minute CPU budget here allows
about 4 000. In that budget 1e-6 leaves the networks at their identity initialisation (only η
moves): on SmolLM2-135M after 40 steps (400 edits), validation loss 0.72 and efficacy 0.73 with 1e-6
against 0.62 and 0.93 with 1e-4 (30 held-out CounterFact records each). ``lr=1e-6`` restores MEND's
value. MEND's first optimiser also steps η with the network rate (η is in both optimisers); here η
has only its own, which differs from MEND by that negligible 1e-6 term.

Records come from a CounterFact (or zsRE) file. A seeded permutation holds out the first
``val_size`` records for validation (never trained on); the rest are visited in a seeded order per
epoch, so the record of every edit is a function of (seed, edit index) and a resumed run continues
exactly where the checkpoint left it. ``DIR/checkpoint.pt`` (networks, running statistics, both
optimisers, curves) is written atomically every ``checkpoint_every`` steps and at the end, with
``curve.jsonl`` (per step) and ``val.jsonl`` (per validation); the final editor goes to
``DIR/editor`` (``mend.safetensors`` + ``mend.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prune_ext.io import atomic_write, atomic_write_text, json_text, write_json

from ..models import arch_spec, editing_mode, get_module, model_id
from ..requests import EditRequest, load_requests
from ..tokens import pad_id
from .editor import default_mend_layers, mend_module_templates
from .grads import Row, RowBatch, edited_shape, gradient_factors, low_rank_edits, make_row, mean_nll, row_logprobs
from .network import MendNetConfig, MendNetworks

__all__ = ["DEFAULT_RANK", "DEFAULT_STEPS", "MendTrainConfig", "TrainResult", "edit_objective", "train_mend",
           "unvisited_records"]

DEFAULT_STEPS = 400
DEFAULT_RANK = 256
CHECKPOINT = "checkpoint.pt"
# settings that define a run: a resumed run must agree on all of them
_IDENTITY = ("model", "data", "val_size", "seed", "edits_per_step", "lr", "lr_lr", "edit_lr", "c_edit", "c_loc",
             "grad_clip", "rank", "n_hidden", "layers")


@dataclass(kw_only=True)
class MendTrainConfig:
    """Settings of one MEND training run (MEND's config names in brackets).

    Attributes:
        out: output folder (checkpoint, curves, the trained editor); an existing run there resumes.
        model: ``"smollm2-135m"`` or a local Hugging Face folder.
        data: CounterFact or zsRE JSON file of edit records.
        steps: optimiser steps in total (each over ``edits_per_step`` edits).
        val_size: records held out for validation (never trained on).
        seed: seed of the split, the visiting order and the network initialisation.
        edits_per_step: edits whose gradients one optimiser step averages [``accumulate_bs``: 10].
        lr: Adam learning rate of the networks (MEND's ``lr`` is 1e-6; see the module docstring).
        lr_lr: Adam learning rate of the step sizes η [``lr_lr``: 1e-4].
        edit_lr: initial η [``edit_lr``: 1e-4].
        c_edit, c_loc: weights of the edit and locality losses [``cedit``: 0.1, ``cloc``: 1.0].
        grad_clip: gradient-norm clip [``grad_clip``: 100].
        rank, n_hidden: network architecture [``n_hidden``: 1]. ``rank`` is 256, not MEND's 1920:
            MEND set 1920 for GPT-2 XL-sized layers (dim u + dim δ = 8000); for SmolLM2's
            576 + 1536 = 2112 it would be 91 % of full width, 32.5 M parameters (130 MB in
            float32) against 4.4 M (17.6 MB) at 256, which ships with the package.
        layers: edited blocks (default: the last three).
        val_every: validate every this many steps (and before the first and after the last).
        val_edits: validation records used each time (default: all ``val_size``).
        checkpoint_every: write the checkpoint every this many steps.
        save_dtype: precision of the exported network weights (``float32`` or ``bfloat16``).
    """

    out: str
    model: str = "smollm2-135m"
    data: str | None = None
    steps: int = DEFAULT_STEPS
    val_size: int = 100
    seed: int = 0
    edits_per_step: int = 10
    lr: float = 1e-4
    lr_lr: float = 1e-4
    edit_lr: float = 1e-4
    c_edit: float = 0.1
    c_loc: float = 1.0
    grad_clip: float = 100.0
    rank: int = DEFAULT_RANK
    n_hidden: int = 1
    layers: tuple[int, ...] | None = None
    val_every: int = 100
    val_edits: int | None = None
    checkpoint_every: int = 25
    save_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)
        for name in ("steps", "edits_per_step", "val_every", "checkpoint_every", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"MendTrainConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.val_size < 0:
            raise ValueError(f"MendTrainConfig.val_size must be ≥ 0, got {self.val_size}")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"MendTrainConfig.save_dtype must be 'float32' or 'bfloat16', got {self.save_dtype!r}")


@dataclass
class TrainResult:
    """What :func:`train_mend` did: the networks, the steps done, and the curves."""

    networks: MendNetworks
    steps: int
    curve: list[dict[str, Any]] = field(default_factory=list)
    val_curve: list[dict[str, Any]] = field(default_factory=list)
    editor_dir: Path | None = None
    resumed_from: int = 0


# ---------------------------------------------------------------------------------------------
# one edit


@dataclass(frozen=True)
class _Example:
    """The rows of one training/validation edit."""

    edit: Row
    rephrase: Row | None
    locality: Row
    edit_true: Row | None
    rephrase_true: Row | None


def _example(tokenizer: Any, req: EditRequest, fallback: EditRequest) -> _Example:
    rephrase = req.paraphrase_prompts[0] if req.paraphrase_prompts else None
    if req.neighborhood_prompts:
        answers = req.neighborhood_answers or ((req.target_true,) if req.target_true else ())
        loc_prompt, loc_answer = req.neighborhood_prompts[0], (answers[0] if answers else None)
    else:
        loc_prompt, loc_answer = fallback.prompt, fallback.target_true
    if not loc_answer:  # no answer: score the next token after the prompt as the original model sees it
        loc_answer = fallback.target_true or fallback.target_new
    true = req.target_true
    return _Example(
        edit=make_row(tokenizer, req.prompt, req.target_new),
        rephrase=make_row(tokenizer, rephrase, req.target_new) if rephrase else None,
        locality=make_row(tokenizer, loc_prompt, loc_answer),
        edit_true=make_row(tokenizer, req.prompt, true) if true else None,
        rephrase_true=make_row(tokenizer, rephrase, true) if (true and rephrase) else None,
    )


def edit_objective(
    model: nn.Module,
    networks: MendNetworks,
    example: _Example,
    pad: int,
    *,
    c_edit: float,
    c_loc: float,
    train: bool,
    blocks: nn.ModuleList | None = None,
    first_block: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MEND's loss for one edit (see the module docstring) and its diagnostics.

    With ``train`` the networks are in training mode (their statistics take this edit's tokens) and
    the loss carries the graph to their parameters; otherwise everything runs without a graph and
    the diagnostics include the CounterFact-style success flags (P(new) > P(true)). With ``blocks``
    and ``first_block`` (the lowest edited block), the edited pass starts at that block from the
    hidden states of the first pass (exact; the blocks below are unchanged by the edit)."""
    names = networks.module_names
    rows = [example.edit] + ([example.rephrase] if example.rephrase else []) + [example.locality]
    n_rewrite = len(rows) - 1
    loc_index = n_rewrite
    if not train:
        rows += [r for r in (example.edit_true, example.rephrase_true) if r is not None]
    batch = RowBatch(rows, pad, next(model.parameters()).device)
    grads = gradient_factors(model, names, batch, 1, blocks=blocks, first_block=first_block)
    loc_sel = batch.tgt_row == loc_index
    base_lp = grads.log_probs[loc_sel]
    networks.train(train)
    with torch.set_grad_enabled(train):
        pairs = networks.update_factors(grads.factors)
        with low_rank_edits(model, pairs):
            log_probs = row_logprobs(model, batch, grads.start)
        nll = mean_nll(batch, log_probs)
        l_edit = nll[:n_rewrite].mean()
        l_loc = (base_lp.exp() * (base_lp - log_probs[loc_sel])).sum(-1).mean()
        total = c_edit * l_edit + c_loc * l_loc
    with torch.no_grad():
        edit_sel = batch.tgt_row == 0
        argmax_ok = log_probs[edit_sel].argmax(-1) == batch.tgt_ids[edit_sel]
        info = {
            "loss": float(total), "loss_edit": float(l_edit), "loss_loc": float(l_loc),
            "nll_pre": float(grads.loss), "nll_post": float(nll[0]), "acc": float(argmax_ok.all()),
            "tokens": int(grads.factors[names[0]][0].shape[0]),
        }
        if not train:
            extra = n_rewrite + 1
            if example.edit_true is not None:
                info["efficacy"] = float(-nll[0] > -nll[extra])
                if example.rephrase is not None and example.rephrase_true is not None:
                    info["generalization"] = float(-nll[1] > -nll[extra + 1])
    return total, info


# ---------------------------------------------------------------------------------------------
# the run


def _order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (epoch + 1)))


def _split(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    if val_size >= n:
        raise ValueError(f"val_size {val_size} leaves no training records out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[:val_size], perm[val_size:]


def _mean_info(infos: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = {k for info in infos for k in info}
    out = {}
    for k in sorted(keys):
        vals = [info[k] for info in infos if k in info and math.isfinite(info[k])]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out


def _write_lines(path: Path, records: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json_text(r) + "\n" for r in records))


def _identity(config: MendTrainConfig, data_digest: str) -> dict[str, Any]:
    d = asdict(config)
    d["data"] = data_digest  # the records themselves, wherever the file is
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in _IDENTITY}


def _digest(requests: Sequence[EditRequest]) -> str:
    h = hashlib.sha256()
    for r in requests:
        h.update(json.dumps([r.prompt, r.subject, r.target_new, r.target_true, list(r.paraphrase_prompts),
                             list(r.neighborhood_prompts), list(r.neighborhood_answers)]).encode())
    return h.hexdigest()[:16]


def train_mend(
    config: MendTrainConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    requests: Sequence[EditRequest] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train (or resume training) MEND's networks as ``config`` says; see the module docstring.

    ``model``/``tokenizer`` default to ``load_model(config.model)`` and ``requests`` to the records
    of ``config.data``. ``stop_after`` ends this call after that many steps (after a checkpoint), as
    if the run had been killed there. Returns the networks and the curves; the editor is exported
    to ``out/editor`` once all ``config.steps`` are done.
    """
    out = Path(config.out)
    if requests is None:
        if config.data is None:
            raise ValueError("train-mend needs --data (a CounterFact or zsRE JSON file)")
        if not Path(config.data).is_file():
            raise FileNotFoundError(f"data file {config.data} does not exist")
        requests = load_requests(config.data, on_error="skip")
    if model is None or tokenizer is None:
        from ..models import load_model

        model, tokenizer = load_model(config.model)
    requests = list(requests)
    identity = _identity(config, _digest(requests))
    val_idx, train_idx = _split(len(requests), config.val_size, config.seed)
    layers = config.layers or default_mend_layers(model)
    blocks = get_module(model, arch_spec(model).block_template.rpartition(".")[0])
    first_block = min(layers)
    pad = pad_id(tokenizer)
    names = [t.format(layer) for layer in layers for t in mend_module_templates(model)]
    shapes = [edited_shape(model, n) for n in names]
    net_config = MendNetConfig(rank=config.rank, n_hidden=config.n_hidden, edit_lr=config.edit_lr, seed=config.seed)
    networks = MendNetworks(names, shapes, net_config).to(next(model.parameters()).device)
    opt = torch.optim.Adam(networks.network_parameters(), lr=config.lr)
    lr_opt = torch.optim.Adam([networks.edit_lrs], lr=config.lr_lr)
    curve: list[dict[str, Any]] = []
    val_curve: list[dict[str, Any]] = []
    step, elapsed = 0, 0.0

    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["identity"] != identity:
            diff = [k for k in _IDENTITY if state["identity"].get(k) != identity[k]]
            raise ValueError(f"{out} holds a MEND run with other settings ({', '.join(diff)}); use another --out")
        networks.load_state_dict(state["networks"])
        opt.load_state_dict(state["opt"])
        lr_opt.load_state_dict(state["lr_opt"])
        step, elapsed = state["step"], state["elapsed"]
        curve, val_curve = state["curve"], state["val_curve"]
    resumed_from = step
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "split.json", {"seed": config.seed, "records": len(requests), "data": config.data,
                                    "data_digest": identity["data"], "val": val_idx})
    write_json(out / "train_config.json", asdict(config))

    def example(i: int) -> _Example:
        return _example(tokenizer, requests[i], requests[(i + 1) % len(requests)])

    def checkpoint() -> None:
        state = {
            "identity": identity, "step": step, "elapsed": elapsed, "networks": networks.state_dict(),
            "opt": opt.state_dict(), "lr_opt": lr_opt.state_dict(), "curve": curve, "val_curve": val_curve,
        }
        with atomic_write(ckpt_path) as tmp:
            torch.save(state, tmp)
        _write_lines(out / "curve.jsonl", curve)
        _write_lines(out / "val.jsonl", val_curve)

    def validate() -> None:
        chosen = val_idx[: config.val_edits] if config.val_edits else val_idx
        if not chosen:
            return
        infos = []
        with editing_mode(model):
            for i in tqdm(chosen, desc="validate", leave=False, disable=not progress):
                infos.append(edit_objective(model, networks, example(i), pad, c_edit=config.c_edit,
                                            c_loc=config.c_loc, train=False, blocks=blocks,
                                            first_block=first_block)[1])
        val_curve.append({"step": step, "n": len(chosen), **_mean_info(infos)})

    n_train = len(train_idx)
    done_here = 0
    bar = tqdm(total=config.steps, initial=step, desc="train-mend", unit="step", disable=not progress)
    try:
        if step == 0 and not val_curve:
            validate()
        with editing_mode(model):
            while step < config.steps:
                start = time.perf_counter()
                infos = []
                for j in range(config.edits_per_step):
                    k = step * config.edits_per_step + j
                    epoch, pos = divmod(k, n_train)
                    idx = train_idx[int(_order(n_train, config.seed, epoch)[pos])]
                    loss, info = edit_objective(model, networks, example(idx), pad, c_edit=config.c_edit,
                                                c_loc=config.c_loc, train=True, blocks=blocks,
                                                first_block=first_block)
                    if torch.isfinite(loss):  # MEND's safe_backward skips non-finite losses
                        (loss / config.edits_per_step).backward()
                    else:
                        info["skipped"] = 1.0
                    infos.append(info)
                params = list(networks.parameters())
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                lr_opt.step()
                opt.zero_grad(set_to_none=True)
                lr_opt.zero_grad(set_to_none=True)
                step += 1
                done_here += 1
                elapsed += time.perf_counter() - start
                row = {"step": step, **_mean_info(infos), "grad_norm": float(grad_norm),
                       "eta": [round(float(x), 8) for x in networks.edit_lrs.detach()], "seconds": round(elapsed, 2)}
                curve.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", edit=f"{row['loss_edit']:.2f}",
                                loc=f"{row['loss_loc']:.3f}", acc=f"{row['acc']:.2f}")
                if step % config.val_every == 0 or step == config.steps:
                    validate()
                if step % config.checkpoint_every == 0 or step == config.steps:
                    checkpoint()
                if stop_after is not None and done_here >= stop_after:
                    if step % config.checkpoint_every != 0:
                        checkpoint()
                    break
    finally:
        bar.close()
    editor_dir = None
    if step >= config.steps:
        dtype = torch.bfloat16 if config.save_dtype == "bfloat16" else torch.float32
        summary = {"model": model_id(model), "data": config.data, "steps": step, "edits": step * config.edits_per_step,
                   "train_seconds": round(elapsed, 1), "final_val": val_curve[-1] if val_curve else None,
                   "data_digest": identity["data"], "validation_records": val_idx,
                   "training": {k: v for k, v in asdict(config).items() if k in _IDENTITY}}
        editor_dir = networks.save(out / "editor", dtype=dtype, extra=summary)
    return TrainResult(networks, step, curve, val_curve, editor_dir, resumed_from)


def unvisited_records(meta: dict[str, Any], n_records: int) -> list[int]:
    """Indices of the training records a finished run never edited (beyond its validation records),
    from an exported editor's ``mend.json``: with ``steps × edits_per_step`` below the number of
    training records, the tail of the first epoch's order was never reached."""
    training = meta["training"]
    _, train_idx = _split(n_records, training["val_size"], training["seed"])
    visited = meta["steps"] * training["edits_per_step"]
    if visited >= len(train_idx):
        return []
    order = _order(len(train_idx), training["seed"], 0).tolist()
    return [train_idx[i] for i in order[visited:]]


def config_from_args(**kwargs: Any) -> MendTrainConfig:
    """A config from keyword arguments, dropping ``None`` values (for the CLI)."""
    fields = {f.name for f in dataclasses.fields(MendTrainConfig)}
    return MendTrainConfig(**{k: v for k, v in kwargs.items() if v is not None and k in fields})


if __name__ == "__main__":  # pragma: no cover
    import sys

    from prune_ext.cli import main

    sys.exit(main(["train-mend", *sys.argv[1:]]))
