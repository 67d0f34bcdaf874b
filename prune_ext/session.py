"""A sequential editing session with PRUNE in the loop.

The session owns, for every edited matrix, the original weight W (kept once), the cumulative update
ΔW as low-rank factors A Bᵀ (appended per edit, recompressed exactly when the rank passes a bound;
dense when an editor gives no factors) and σmax(W) (computed once). Restraint is the paper's:
W'_N = W + restrained ΔW, computed from the factors in O((m + n) r²) and written into the model in
place; the restrained ΔW then becomes the cumulative update that later edits add to, as in the
paper's "multiple" setting (appendix C.6). The session saves itself atomically every few edits
and on interrupt, and resumes from its last save to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import restraint
from .updates import LowRankUpdate

Restrain = Literal["none", "log", "linear"]
FORMAT_VERSION = 1


@dataclass
class MatrixDiagnostics:
    """Spectral state of one edited matrix: W_N = W + ΔW and W'_N = W + restrained ΔW.

    Exact (all singular values in float64) when ``exact``; otherwise σmax is certified by Lanczos
    (relative 1e-7) and σmin comes from float32 singular values (absolute error ~1e-7 σmax).
    """

    module: str
    sigma_max: float
    sigma_min: float
    condition_number: float
    sigma_max_restrained: float
    sigma_min_restrained: float
    condition_number_restrained: float
    delta_sigma_max: float
    delta_rank: int
    values_above_threshold: int
    threshold: float
    exact: bool


class MatrixLedger:
    """W, the cumulative ΔW (factors or dense) and σmax(W) for one weight matrix, in float32."""

    def __init__(self, name: str, original: torch.Tensor, store_device: str | torch.device = "cpu") -> None:
        self.name = name
        self.original = original.detach().to(store_device).clone()  # in the model's dtype, exact
        rows, cols = original.shape
        self.left = torch.zeros(rows, 0, device=store_device)
        self.right = torch.zeros(cols, 0, device=store_device)
        self.dense: torch.Tensor | None = None  # used instead of the factors once an update has none
        self.compressed_rank = 0
        self.sigma_w = restraint.spectral_norm(self.original)

    @property
    def rank_bound(self) -> int:
        return min(self.original.shape) if self.dense is not None else self.left.shape[1]

    def append(self, update: LowRankUpdate | torch.Tensor, max_rank: int) -> None:
        """Add one edit's update (factors, or a dense matrix) to ΔW."""
        if isinstance(update, torch.Tensor):
            self.to_dense()
            self.dense += update.detach().to(self.dense)
            return
        left, right = update.left.to(self.left), update.right.to(self.right)
        if self.dense is not None:
            self.dense.addmm_(left, right.T)
            return
        self.left, self.right = torch.cat([self.left, left], 1), torch.cat([self.right, right], 1)
        # recompress past the bound, and again only once the rank doubled (no QR per edit if ΔW is
        # genuinely of high rank)
        if self.left.shape[1] > max(max_rank, 2 * self.compressed_rank):
            self.recompress()

    def recompress(self) -> None:
        """Exact recompression: the thin SVD of A Bᵀ from QR(A), QR(B) and an r × r SVD."""
        U, S, V = restraint.ops.factored_svd(self.left, self.right)
        keep = S > S[:1].clamp_min(1e-30) * 1e-7 if S.numel() else S.bool()
        self.left, self.right = (U * S)[:, keep].contiguous(), V[:, keep].contiguous()
        self.compressed_rank = self.left.shape[1]
        if self.left.shape[1] > min(self.original.shape) // 2:  # factors no longer pay
            self.to_dense()

    def to_dense(self) -> None:
        if self.dense is None:
            self.dense = self.left @ self.right.T
            self.left, self.right = self.left[:, :0], self.right[:, :0]

    def delta(self) -> torch.Tensor:
        """ΔW as a dense float32 matrix."""
        return self.dense.clone() if self.dense is not None else self.left @ self.right.T

    def restrained(self, fn: str, alpha: float, beta: float) -> tuple[int, torch.Tensor | tuple]:
        """(number of values above σ_W, restrained ΔW as factors or dense), ΔW left as it is."""
        if self.dense is not None:
            out, info = restraint.restrain(self.dense.clone(), self.sigma_w, alpha, fn=fn, beta=beta,
                                           return_info=True)
            return info.restrained, out
        if self.left.shape[1] == 0:
            return 0, (self.left, self.right)
        new_left, new_right, sigma = restraint.restrain_factors(self.left, self.right, self.sigma_w, alpha,
                                                                fn=fn, beta=beta)
        return int((sigma > self.sigma_w).sum()), (new_left, new_right)

    def weight(self, delta: torch.Tensor | tuple | None = None) -> torch.Tensor:
        """W + ΔW (or W + the given ΔW) in float32."""
        delta = self.dense if delta is None and self.dense is not None else delta
        if delta is None:
            delta = (self.left, self.right)
        base = self.original.to(torch.float32)
        return torch.addmm(base, delta[0], delta[1].T) if isinstance(delta, tuple) else base + delta

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"original": self.original, "left": self.left, "right": self.right}
        if self.dense is not None:
            out["dense"] = self.dense
        return {f"{self.name}::{k}": v.contiguous() for k, v in out.items()}


def _get_weight(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight


class EditingSession:
    """Sequential editing of ``model`` with PRUNE in the loop.

    Args:
        model, tokenizer: a Hugging Face causal LM (float32, bfloat16 or float16; any device map).
        editor: ``"rome"``, ``"memit"``, or an object with ``edit(request_or_batch) -> list[LowRankUpdate]``
            that applies its updates to ``model``.
        hparams: editor hyper-parameters (or a dict of overrides of the model's defaults).
        restrain: ``"none"``, ``"log"`` (the paper's F, with ``alpha``) or ``"linear"`` (with ``beta``).
        every: restrain every ``every`` edits (1: after every edit, the paper's "multiple"; a MEMIT
            batch that reaches a multiple of ``every`` is followed by a restraint); ``None``: once,
            after the last edit (:meth:`finish`; the paper's main setting).
        max_rank: recompress the factors when their rank passes this (default 64 + min(m, n) // 8).
        checkpoint: a file to save the session to (atomically) every ``save_every`` edits and on
            interrupt; if it exists, the session resumes from it.
        store_device: where W and the factors live (default CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        editor: str | Any = "rome",
        hparams: Any = None,
        *,
        restrain: Restrain = "log",
        alpha: float = 1.2,
        beta: float = 2.0,
        every: int | None = None,
        max_rank: int | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        save_every: int = 10,
        store_device: str | torch.device = "cpu",
        corpus: str | os.PathLike[str] | None = None,
        cov_cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> None:
        if restrain not in ("none", "log", "linear"):
            raise ValueError(f"restrain must be 'none', 'log' or 'linear', got {restrain!r}")
        if every is not None and every < 1:
            raise ValueError(f"every must be a positive number of edits, got {every}")
        if restrain != "none":
            restraint._fn_args(restrain, alpha, beta)  # fail now, not after hours of editing
        self.model, self.tokenizer = model, tokenizer
        self.method = editor if isinstance(editor, str) else type(editor).__name__.lower()
        if isinstance(editor, str):
            from .editing import make_editor

            editor = make_editor(model, tokenizer, editor, hparams, corpus=corpus, cov_cache_dir=cov_cache_dir,
                                 progress=progress)
        self.editor = editor
        self.restrain, self.alpha, self.beta, self.every = restrain, alpha, beta, every
        self.max_rank = max_rank
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.save_every = save_every
        self.store_device = store_device
        self.progress = progress
        self.ledgers: dict[str, MatrixLedger] = {}
        self.edits_done = 0  # requests edited so far
        self.steps_done = 0  # editor calls so far (a MEMIT batch is one step)
        self.restraints: list[dict[str, Any]] = []  # when and how much each restraint changed
        self.finished = False
        self.edit_seconds = 0.0  # time spent in the editor (restraint time is in self.restraints)
        for name in self._edited_modules():  # known up front: diagnostics exist before the first edit
            self.ledgers[name] = MatrixLedger(name, _get_weight(model, name), store_device)
        if self.checkpoint is not None and self.checkpoint.exists():
            self._load(self.checkpoint)

    # -- editing -------------------------------------------------------------------------------

    def edit(self, request: Any) -> list[LowRankUpdate]:
        """One editor step (ROME: one request; MEMIT: a list of requests, one batch), bookkept and
        restrained if the schedule says so."""
        originals = {name: _get_weight(self.model, name).detach().clone()
                     for name in self._edited_modules() if name not in self.ledgers}
        start = time.perf_counter()
        updates = self.editor.edit(request)
        self.edit_seconds += time.perf_counter() - start
        for upd in updates:
            if upd.module not in self.ledgers:
                weight = originals.get(upd.module)
                if weight is None:  # the editor touched a module for the first time: undo its update
                    weight = _get_weight(self.model, upd.module).detach().float() - upd.dense().to(
                        _get_weight(self.model, upd.module).device)
                    weight = weight.to(_get_weight(self.model, upd.module).dtype)
                self.ledgers[upd.module] = MatrixLedger(upd.module, weight, self.store_device)
            ledger = self.ledgers[upd.module]
            ledger.append(upd, self.max_rank or 64 + min(ledger.original.shape) // 8)
        self.steps_done += 1
        before = self.edits_done
        self.edits_done += len(request) if isinstance(request, (list, tuple)) else 1
        # every k *edits* (requests), also when a MEMIT batch holds several: restrain when this step
        # crossed a multiple of k
        if self.restrain != "none" and self.every is not None and self.edits_done // self.every > before // self.every:
            self.restrain_now()
        return updates

    def _edited_modules(self) -> list[str]:
        hp = getattr(self.editor, "hparams", None)
        if hp is None:
            return []
        if hasattr(hp, "layers"):
            return [hp.module_name(layer) for layer in hp.layers]
        name = getattr(hp, "module_name", None)
        return [name] if isinstance(name, str) else []

    def run(
        self,
        requests: Sequence[Any],
        batch_size: int = 1,
        on_step: Callable[[EditingSession], None] | None = None,
    ) -> EditingSession:
        """Edit ``requests`` in order, from where the session stands (``edits_done``), saving every
        ``save_every`` edits and on interrupt, then :meth:`finish`. ``on_step`` is called after every
        step (for checkpoints of evaluation)."""
        if self.method != "memit":
            batch_size = 1  # ROME edits one request per step
        todo = list(requests)[self.edits_done :]
        steps = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        last_save = self.edits_done
        try:
            for batch in tqdm(steps, desc=f"{self.method} edits", unit="step", disable=not self.progress):
                self.edit(batch if self.method == "memit" else batch[0])
                if on_step is not None:
                    on_step(self)
                if self.checkpoint is not None and self.edits_done - last_save >= self.save_every:
                    self.save()
                    last_save = self.edits_done
        except KeyboardInterrupt:
            if self.checkpoint is not None:
                self.save()
            raise
        self.finish()
        return self

    def finish(self) -> None:
        """The schedule's last restraint: once, after the last edit (the paper's main setting); with
        ``every`` k, only if edits came after the last restraint (restraining twice in a row would
        shrink the restrained values again)."""
        pending = not self.restraints or self.restraints[-1]["edits"] != self.edits_done
        if self.restrain != "none" and not self.finished and pending:
            self.restrain_now()
        self.finished = True
        if self.checkpoint is not None:
            self.save()

    # -- restraint ------------------------------------------------------------------------------

    def restrain_now(self) -> dict[str, int]:
        """Restrain every edited matrix now: weight ← W + restrained ΔW, and ΔW ← restrained ΔW.
        Returns the number of singular values restrained per module (0: nothing written)."""
        if self.restrain == "none":
            raise RuntimeError("this session was created with restrain='none'")
        start = time.perf_counter()
        changed: dict[str, int] = {}
        for name, ledger in self.ledgers.items():
            k, new_delta = ledger.restrained(self.restrain, self.alpha, self.beta)
            changed[name] = k
            if k == 0:
                continue
            if isinstance(new_delta, tuple):
                ledger.left, ledger.right = new_delta
            else:
                ledger.dense = new_delta
            weight = _get_weight(self.model, name)
            with torch.no_grad():
                weight.copy_(ledger.weight().to(device=weight.device, dtype=weight.dtype))
        seconds = time.perf_counter() - start
        self.restraints.append({"edits": self.edits_done, "restrained": changed, "seconds": seconds})
        return changed

    def weights(self, restrained: bool) -> dict[str, torch.Tensor]:
        """W + ΔW (``restrained=False``) or W + restrained ΔW per module, float32, without touching
        the model: with the once-at-the-end schedule one editing pass yields both final models."""
        out = {}
        for name, ledger in self.ledgers.items():
            if restrained and self.restrain != "none":
                out[name] = ledger.weight(ledger.restrained(self.restrain, self.alpha, self.beta)[1])
            else:
                out[name] = ledger.weight()
        return out

    @contextmanager
    def using(self, weights: dict[str, torch.Tensor]) -> Iterator[None]:
        """Temporarily load ``weights`` (from :meth:`weights`) into the model."""
        saved = {name: _get_weight(self.model, name).detach().clone() for name in weights}
        try:
            with torch.no_grad():
                for name, w in weights.items():
                    target = _get_weight(self.model, name)
                    target.copy_(w.to(device=target.device, dtype=target.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, w in saved.items():
                    _get_weight(self.model, name).copy_(w)

    # -- diagnostics ----------------------------------------------------------------------------

    def diagnostics(self, exact: bool | None = None) -> dict[str, MatrixDiagnostics]:
        """σmax, σmin and κ of W_N and W'_N, σmax and rank of ΔW, per edited matrix.

        ``exact=None`` picks float64 singular values when min(m, n) ≤ 2048 (SmolLM2, GPT-2 XL),
        else the cheaper estimates described in :class:`MatrixDiagnostics`.
        """
        out = {}
        for name, ledger in self.ledgers.items():
            use_exact = exact if exact is not None else min(ledger.original.shape) <= 2048
            delta = ledger.delta()
            sv_delta = torch.linalg.svdvals(delta.double() if use_exact else delta)
            tol = sv_delta[:1].clamp_min(1e-30) * max(delta.shape) * torch.finfo(delta.dtype).eps  # ΔW's rounding
            k = int((sv_delta > ledger.sigma_w).sum())
            n_before = _extremes(ledger.weight(), use_exact)
            if self.restrain != "none" and k > 0:
                n_after = _extremes(ledger.weight(ledger.restrained(self.restrain, self.alpha, self.beta)[1]),
                                    use_exact)
            else:
                n_after = n_before
            out[name] = MatrixDiagnostics(
                module=name,
                sigma_max=n_before[0], sigma_min=n_before[1], condition_number=_kappa(*n_before),
                sigma_max_restrained=n_after[0], sigma_min_restrained=n_after[1],
                condition_number_restrained=_kappa(*n_after),
                delta_sigma_max=float(sv_delta[0]) if sv_delta.numel() else 0.0,
                delta_rank=int((sv_delta > tol).sum()),
                values_above_threshold=k, threshold=ledger.sigma_w, exact=use_exact,
            )
        return out

    # -- persistence ----------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, ledger in self.ledgers.items():
            tensors.update(ledger.tensors())
            tensors[f"{name}::weight"] = _get_weight(self.model, name).detach().cpu().contiguous()
        meta = {
            "format": FORMAT_VERSION,
            "method": self.method,
            "restrain": self.restrain, "alpha": self.alpha, "beta": self.beta, "every": self.every,
            "edits_done": self.edits_done, "steps_done": self.steps_done, "finished": self.finished,
            "edit_seconds": self.edit_seconds,
            "restraints": self.restraints,
            "modules": {name: {"sigma_w": ledger.sigma_w, "compressed_rank": ledger.compressed_rank}
                        for name, ledger in self.ledgers.items()},
            "prefixes": getattr(self.editor, "_prefixes", None),
        }
        tensors["__rng_state__"] = torch.get_rng_state()
        return tensors, meta

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the session atomically (temporary file in the same folder, then rename)."""
        target = Path(path) if path is not None else self.checkpoint
        if target is None:
            raise ValueError("no checkpoint path: pass one here or to EditingSession(checkpoint=...)")
        target.parent.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state_dict()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"prune_ext": json.dumps(meta)})
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def _load(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["prune_ext"])
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
        for key in ("restrain", "every"):
            if meta[key] != getattr(self, key):
                raise ValueError(f"{path} was saved with {key}={meta[key]!r}, this session has "
                                 f"{key}={getattr(self, key)!r}: use another checkpoint path")
        tensors = load_file(str(path))
        for name, info in meta["modules"].items():
            ledger = MatrixLedger.__new__(MatrixLedger)
            ledger.name, ledger.sigma_w, ledger.compressed_rank = name, info["sigma_w"], info["compressed_rank"]
            ledger.original = tensors[f"{name}::original"].to(self.store_device)
            ledger.left = tensors[f"{name}::left"].to(self.store_device)
            ledger.right = tensors[f"{name}::right"].to(self.store_device)
            dense = tensors.get(f"{name}::dense")
            ledger.dense = dense.to(self.store_device) if dense is not None else None
            self.ledgers[name] = ledger
            weight = _get_weight(self.model, name)
            with torch.no_grad():
                weight.copy_(tensors[f"{name}::weight"].to(device=weight.device, dtype=weight.dtype))
        self.edits_done, self.steps_done = meta["edits_done"], meta["steps_done"]
        self.finished, self.restraints = meta["finished"], meta["restraints"]
        self.edit_seconds = meta["edit_seconds"]
        if meta.get("prefixes") is not None and hasattr(self.editor, "_prefixes"):
            self.editor._prefixes = meta["prefixes"]
        torch.set_rng_state(tensors["__rng_state__"])


def _extremes(W: torch.Tensor, exact: bool) -> tuple[float, float]:
    if exact:
        s = torch.linalg.svdvals(W.double())
        return float(s[0]), float(s[-1])
    return restraint.spectral_norm(W), float(torch.linalg.svdvals(W.float())[-1])


def _kappa(smax: float, smin: float) -> float:
    return math.inf if smin == 0 else smax / smin


def diagnostics_as_dict(diags: dict[str, MatrixDiagnostics]) -> dict[str, dict[str, Any]]:
    """JSON-ready form of :meth:`EditingSession.diagnostics`."""
    return {name: asdict(d) for name, d in diags.items()}

