"""A sequential editing session: the one writer of the edited weights.

Editors compute updates and never write the model. The session keeps, for every edited matrix, the
original weight W (once), the cumulative update ΔW as low-rank factors and σmax(W) (a
:class:`~prune_ext.session.ledger.MatrixLedger`), and sets each edited matrix to exactly one of

* ``W + ΔW`` (what it holds while editing and in the unrestrained view), or
* ``W + F(ΔW)`` (the restrained view: PRUNE's W'_N, computed from the factors in O((m + n) r²)),

through :meth:`EditingSession.hold`. A scheduled restraint (every k edits, or once at
:meth:`~EditingSession.finish`) replaces ΔW by F(ΔW) in the books, as in the paper's "multiple"
setting (appendix C.6), so later edits add to the restrained update. Diagnostics and saved weights
read what the model holds now (:meth:`~EditingSession.held_weights`): every number describes the
weights that were evaluated. The session saves its books atomically every few edits and on Ctrl-C
(never in the middle of a step) and resumes from them to bit-identical weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from prune_ext import restraint
from prune_ext.io import atomic_write
from prune_ext.updates import LowRankUpdate

from .ledger import MatrixLedger
from .schedule import Schedule

__all__ = [
    "HELD_EDITED", "HELD_RESTRAINED", "EditingSession", "MatrixDiagnostics", "diagnostics_as_dict", "weight_digest",
]

Restrain = Literal["none", "log", "linear"]
FORMAT_VERSION = 2
HELD_EDITED = "W+dW"  # the model holds W + ΔW (ΔW as the books have it: restrained at scheduled points)
HELD_RESTRAINED = "W+F(dW)"  # the model holds W + F(ΔW): the restrained view of the books


@dataclass
class MatrixDiagnostics:
    """Spectral state of one edited matrix exactly as the model holds it, and of its ΔW = held − W.

    ``exact``: all singular values in float64 of the held weight (in its own dtype, widened); else
    σmax is certified by Lanczos (relative 1e-7) and σmin comes from float32 singular values.
    ``sha256`` identifies the held weight's bytes.
    """

    module: str
    held: str
    dtype: str
    sigma_max: float
    sigma_min: float
    condition_number: float
    delta_sigma_max: float
    delta_fro: float
    delta_rank: int
    values_above_threshold: int
    threshold: float
    exact: bool
    sha256: str


def _get_weight(model: nn.Module, name: str) -> torch.Tensor:
    from prune_ext.editing.models import check_editable

    return check_editable(model, name)


def default_store_device(weight: torch.Tensor) -> torch.device:
    """Where a matrix's books live by default: on its own GPU while that GPU has room for them
    (W, the factors, and the restraint's work: ~4 copies of the matrix in float32, plus 1 GiB), so the
    restraint runs there with the CUDA kernels and nothing crosses the bus; else on the CPU."""
    if weight.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(weight.device)
        if free > 4 * weight.numel() * 4 + (1 << 30):
            return weight.device
    return torch.device("cpu")


def weight_digest(weight: torch.Tensor) -> str:
    """sha256 of a weight's bytes (dtype and shape included): which matrix a record describes."""
    t = weight.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class EditingSession:
    """Sequential editing of ``model`` with PRUNE in the loop; the only writer of its edited weights.

    Args:
        model, tokenizer: a Hugging Face causal LM (float32, bfloat16 or float16; any device map).
        editor: a registered editor name (``"rome"``, ``"memit"``, …) or an object with
            ``compute(step) -> list[LowRankUpdate]`` that does not write the model.
        hparams: editor hyper-parameters (or a dict of overrides of the model's defaults).
        restrain: ``"none"``, ``"log"`` (the paper's F, with ``alpha``) or ``"linear"`` (with ``beta``).
        every: restrain every ``every`` edits (see :class:`Schedule`); ``None``: once, at :meth:`finish`.
        threshold_scale, protect_energy, protect_damp: a spectral variant of the restraint
            (:class:`prune_ext.spectral.Restraint`: F above ``threshold_scale`` · σmax(W); first remove,
            or damp by ``protect_damp``, ΔW's component in W's top singular subspaces holding a share
            ``protect_energy`` of W's energy). ``restrain="none"`` with ``protect_energy``: protection only.
        max_rank: recompress the factors when their rank passes this (default 64 + min(m, n) // 8).
        checkpoint: a file to save the session to (atomically) every ``save_every`` edits and on
            interrupt; if it exists, the session resumes from it.
        store_device: where W and the factors live, and so where the restraint runs (default: per
            matrix, its own GPU while it has room, else the CPU: :func:`default_store_device`).
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
        store_device: str | torch.device | None = None,
        corpus: str | os.PathLike[str] | None = None,
        cov_cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        threshold_scale: float = 1.0,
        protect_energy: float | None = None,
        protect_damp: float = 1.0,
    ) -> None:
        self.schedule = Schedule(restrain, every, threshold_scale, protect_energy, protect_damp)
        self.schedule.restraint(alpha, beta)  # fail now, not after hours of editing
        self.model, self.tokenizer = model, tokenizer
        if isinstance(editor, str):
            from prune_ext.editing import make_editor

            editor = make_editor(model, tokenizer, editor, hparams, corpus=corpus, cov_cache_dir=cov_cache_dir,
                                 progress=progress)
        self.editor = editor
        self.method = getattr(editor, "name", "") or type(editor).__name__.lower()
        self.alpha, self.beta = alpha, beta
        self.max_rank = max_rank
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.save_every = save_every
        self.store_device = store_device
        self.progress = progress
        self.ledgers: dict[str, MatrixLedger] = {}
        self.held = HELD_EDITED
        self.edits_done = 0  # requests edited so far
        self.steps_done = 0  # editor calls so far (a MEMIT batch is one step)
        self.restraints: list[dict[str, Any]] = []  # when and how much each restraint changed
        self.finished = False
        self.edit_seconds = 0.0  # time spent in the editor (restraint time is in self.restraints)
        self._in_step = False
        self.saved_edits: int | None = None  # edits_done at the last save to ``checkpoint``
        edited = getattr(editor, "edited_modules", None)
        for name in edited() if callable(edited) else []:  # known up front: diagnostics before any edit
            self._new_ledger(name)
        if self.checkpoint is not None and self.checkpoint.exists():
            self._load(self.checkpoint)

    def _store(self, weight: torch.Tensor) -> torch.device:
        return torch.device(self.store_device) if self.store_device is not None else default_store_device(weight)

    def _new_ledger(self, name: str) -> None:
        weight = _get_weight(self.model, name)
        self.ledgers[name] = MatrixLedger(name, weight, self._store(weight))

    @property
    def restrain(self) -> Restrain:
        return self.schedule.fn

    @property
    def every(self) -> int | None:
        return self.schedule.every

    # -- the one writer -----------------------------------------------------------------------

    def _write(self, name: str, delta: Any = None) -> None:
        ledger = self.ledgers[name]
        weight = _get_weight(self.model, name)
        with torch.no_grad():
            weight.copy_(ledger.weight(delta).to(device=weight.device, dtype=weight.dtype))

    def hold(self, restrained: bool) -> None:
        """Set every edited matrix to W + ΔW (``restrained=False``) or W + F(ΔW) (``True``; only with
        a restraint), ΔW as the books have it. Nothing is written when the model already holds that
        view. (Once a once-at-the-end session is finished the books still hold the unrestrained ΔW
        and the model W + F(ΔW); an every-k session's books are restrained at its scheduled points.)"""
        want = HELD_RESTRAINED if restrained and self.schedule.kind != "none" else HELD_EDITED
        if want == self.held:
            return
        views = self._restrained_views() if want == HELD_RESTRAINED else {}
        for name in self.ledgers:
            self._write(name, views[name][1] if views else None)
        self.held = want

    def held_weights(self) -> dict[str, torch.Tensor]:
        """The edited matrices exactly as the model holds them now (copies, in the model's dtype)."""
        return {name: _get_weight(self.model, name).detach().clone() for name in self.ledgers}

    def weights(self, restrained: bool) -> dict[str, torch.Tensor]:
        """W + ΔW (``restrained=False``) or W + F(ΔW) per module, float32, without touching the model:
        with the once-at-the-end schedule one editing pass yields both final models."""
        out = {}
        views = self._restrained_views() if restrained and self.schedule.kind != "none" else {}
        for name, ledger in self.ledgers.items():
            out[name] = ledger.weight(views[name][1] if views else None)
        return out

    # -- editing -------------------------------------------------------------------------------

    def edit(self, request: Any) -> list[LowRankUpdate]:
        """One editor step (a request, or a batch for a batched editor): the editor computes on
        W + ΔW, the session books and writes the updates, and restrains if the schedule says so."""
        self.hold(restrained=False)  # editors always compute on the books' weights
        start = time.perf_counter()
        updates = self.editor.compute(request)
        self.edit_seconds += time.perf_counter() - start
        count = len(request) if isinstance(request, (list, tuple)) else 1
        self._in_step = True  # from here to the end of the step, an interrupt must not be saved
        try:
            for upd in updates:
                if upd.module not in self.ledgers:  # first touch: the model still holds W there
                    self._new_ledger(upd.module)
                ledger = self.ledgers[upd.module]
                ledger.append(upd, self.max_rank or 64 + min(ledger.original.shape) // 8)
            for name in dict.fromkeys(u.module for u in updates):
                self._write(name)
            before = self.edits_done
            self.steps_done += 1
            self.edits_done += count
            if self.schedule.due(before, self.edits_done):
                self.restrain_now()
        finally:
            self._in_step = False
        return updates

    def run(
        self,
        requests: Sequence[Any],
        batch_size: int = 1,
        on_step: Callable[[EditingSession], None] | None = None,
        *,
        finish: bool = True,
    ) -> EditingSession:
        """Edit ``requests`` in order, from where the session stands (``edits_done``), saving every
        ``save_every`` edits and on interrupt, then :meth:`finish` (unless ``finish=False``).
        ``on_step`` is called after every step (for checkpoints of evaluation)."""
        todo = list(requests)[self.edits_done :]
        size = batch_size if getattr(self.editor, "batched", True) else 1
        steps = [todo[i : i + size] for i in range(0, len(todo), size)]
        last_save = self.edits_done
        batched = getattr(self.editor, "batched", True)
        try:
            for batch in tqdm(steps, desc=f"{self.method} edits", unit="step", disable=not self.progress):
                self.edit(batch if batched else batch[0])
                if self.checkpoint is not None and self.edits_done - last_save >= self.save_every:
                    self.save()
                    last_save = self.edits_done
                if on_step is not None:
                    on_step(self)
        except KeyboardInterrupt:
            if self.checkpoint is not None and not self._in_step:
                self.save()
            raise
        if finish:
            self.finish()
        return self

    def finish(self) -> None:
        """The schedule's last restraint, after which the model holds the final weights.

        Once (the paper's main setting): the model holds W + F(ΔW); the books keep ΔW, so
        ``weights(restrained=False)`` still gives the unrestrained model of the same editing pass.
        Every k edits: ΔW ← F(ΔW) in the books, only if edits came after the last restraint
        (restraining twice in a row would shrink the restrained values again).
        """
        if not self.finished and self.schedule.kind == "once":
            start = time.perf_counter()
            views = self._restrained_views()
            for name, (_, delta) in views.items():
                self._write(name, delta)
            self.held = HELD_RESTRAINED
            self.restraints.append({"edits": self.edits_done, "restrained": {n: k for n, (k, _) in views.items()},
                                    "seconds": time.perf_counter() - start})
        elif not self.finished and self.schedule.kind == "every":
            if not self.restraints or self.restraints[-1]["edits"] != self.edits_done:
                self.restrain_now()
        self.finished = True
        if self.checkpoint is not None:
            self.save()

    def reopen(self) -> None:
        """Go on editing after :meth:`finish` (a run extended to more requests). Once-at-the-end: the
        books still hold the unrestrained ΔW, so the next edit starts from W + ΔW and the extended run
        is the same as one that had been given all its requests from the start. Every k: the books
        keep what ``finish()`` restrained (nothing extra when the old end was a multiple of k)."""
        self.finished = False

    # -- restraint ------------------------------------------------------------------------------

    def _restrained_views(self) -> dict[str, tuple[int, Any]]:
        """Per matrix: (values above σ_W, F(ΔW)), the books left as they are."""
        return self.views(self.schedule.restraint(self.alpha, self.beta))

    def views(self, spec: Any) -> dict[str, tuple[int, Any]]:
        """Per matrix: (values above the threshold, ΔW restrained by ``spec``, a
        :class:`prune_ext.spectral.Restraint`), the books left as they are."""
        return {name: ledger.restrained(spec.fn, spec.alpha, spec.beta, threshold_scale=spec.threshold_scale,
                                        protect_energy=spec.protect_energy, protect_damp=spec.protect_damp)
                for name, ledger in self.ledgers.items()}

    def hold_variant(self, spec: Any) -> None:
        """Set every edited matrix to W + R(ΔW) for another restraint ``spec`` (a
        :class:`prune_ext.spectral.Restraint`), the books left as they are: one editing pass evaluated
        under several once-at-the-end variants. :attr:`held` names it; the next edit holds W + ΔW again."""
        label = f"W+R(dW)[{spec.spec()}]"
        if self.held == label:
            return
        for name, (_, delta) in self.views(spec).items():
            self._write(name, delta)
        self.held = label

    def restrain_now(self) -> dict[str, int]:
        """Restrain every edited matrix now: ΔW ← F(ΔW) in the books and W + F(ΔW) in the model.
        Returns the number of singular values restrained per module (0: nothing changed)."""
        if self.schedule.kind == "none":
            raise RuntimeError("this session was created with restrain='none' and no protection")
        self.hold(restrained=False)
        start = time.perf_counter()
        changed: dict[str, int] = {}
        for name, (k, new_delta) in self._restrained_views().items():
            changed[name] = k
            if k or self.schedule.protects:
                self.ledgers[name].replace(new_delta)
                self._write(name)
        seconds = time.perf_counter() - start
        self.restraints.append({"edits": self.edits_done, "restrained": changed, "seconds": seconds})
        return changed

    # -- diagnostics ----------------------------------------------------------------------------

    def diagnostics(self, exact: bool | None = None) -> dict[str, MatrixDiagnostics]:
        """σmax, σmin and κ of each edited matrix as the model holds it now, and σmax, ‖·‖_F, rank and
        the count above σmax(W) of its ΔW = held − W.

        ``exact=None`` picks float64 singular values when min(m, n) ≤ 2048 (SmolLM2, GPT-2 XL),
        else the cheaper estimates described in :class:`MatrixDiagnostics`.
        """
        out = {}
        for name, held in self.held_weights().items():
            ledger = self.ledgers[name]
            use_exact = exact if exact is not None else min(held.shape) <= 2048
            work = torch.float64 if use_exact else torch.float32
            weight = held.to(device=ledger.original.device, dtype=work)
            delta = weight - ledger.original.to(work)
            sv_delta = torch.linalg.svdvals(delta)
            tol = sv_delta[:1].clamp_min(1e-30) * max(delta.shape) * torch.finfo(held.dtype).eps  # rounding
            smax, smin = _extremes(weight, use_exact)
            out[name] = MatrixDiagnostics(
                module=name, held=self.held, dtype=str(held.dtype).removeprefix("torch."),
                sigma_max=smax, sigma_min=smin, condition_number=_kappa(smax, smin),
                delta_sigma_max=float(sv_delta[0]) if sv_delta.numel() else 0.0,
                delta_fro=float(torch.linalg.vector_norm(delta.double())),
                delta_rank=int((sv_delta > tol).sum()),
                values_above_threshold=int((sv_delta > ledger.sigma_w).sum()), threshold=ledger.sigma_w,
                exact=use_exact, sha256=weight_digest(held),
            )
        return out

    # -- artifacts ------------------------------------------------------------------------------

    def _export_info(self) -> dict[str, Any]:
        return {"source": "EditingSession", "editor": self.method, "edits": self.edits_done, "held": self.held,
                "restrain": self.restrain, "alpha": self.alpha, "beta": self.beta, "every": self.every}

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write the model as it holds its weights now (see :meth:`hold`) as a plain Hugging Face folder
        (safetensors, config, tokenizer; a GGUF-loaded model gets a plain config without
        ``quantization_config``), atomically; ``folder`` must not exist. Loadable with
        ``AutoModelForCausalLM.from_pretrained(folder)``; ``prune_ext_export.json`` says what it holds."""
        from prune_ext.export import EXPORT_INFO, save_hf_folder
        from prune_ext.io import write_json

        target = save_hf_folder(self.model, self.tokenizer, folder,
                                extra=lambda tmp: write_json(tmp / EXPORT_INFO, self._export_info()))
        return target

    def save_adapter(self, folder: str | os.PathLike[str], *, rank: int | None = None) -> Path:
        """Write the session's edits as a PEFT LoRA adapter folder: one LoRA pair per edited matrix with
        ``lora_B @ lora_A`` = held − W, the update the model holds now (ΔW, or F(ΔW) when it holds the
        restrained view), to its numerical rank or at most ``rank`` (its best rank-``rank``
        approximation); scaling 1. ``PeftModel.from_pretrained(base_model, folder)`` on the unedited
        model then computes the session's model. Needs ``peft`` (the ``[export]`` extra)."""
        from prune_ext.export import lora_factors_of, write_lora_adapter

        if rank is not None and rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        held = self.held_weights()
        base = {name: ledger.original for name, ledger in self.ledgers.items()}
        factors = lora_factors_of(self.model, held, base, rank=rank)
        write_lora_adapter(self.model, factors, folder, {**self._export_info(), "max_rank": rank})
        return Path(folder)

    # -- persistence ----------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The books (tensors) and the bookkeeping (JSON-ready): everything a resume needs. The
        model's weights are not saved: they follow from the books and :attr:`held`."""
        tensors: dict[str, torch.Tensor] = {}
        for ledger in self.ledgers.values():
            tensors.update({k: v.cpu() for k, v in ledger.tensors().items()})
        state = getattr(self.editor, "state_tensors", dict)()
        tensors.update({f"editor::{k}": v.detach().cpu().contiguous() for k, v in state.items()})
        tensors["__rng_state__"] = torch.get_rng_state()
        meta = {
            "format": FORMAT_VERSION,
            "method": self.method,
            "restrain": self.restrain, "alpha": self.alpha, "beta": self.beta, "every": self.every,
            "threshold_scale": self.schedule.threshold_scale, "protect_energy": self.schedule.protect_energy,
            "protect_damp": self.schedule.protect_damp,
            "held": self.held,
            "edits_done": self.edits_done, "steps_done": self.steps_done, "finished": self.finished,
            "edit_seconds": self.edit_seconds,
            "restraints": self.restraints,
            "modules": {name: {"sigma_w": ledger.sigma_w, "compressed_rank": ledger.compressed_rank}
                        for name, ledger in self.ledgers.items()},
            "prefixes": getattr(self.editor, "_prefixes", None),
        }
        return tensors, meta

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the session atomically (temporary file, fsync, rename)."""
        target = Path(path) if path is not None else self.checkpoint
        if target is None:
            raise ValueError("no checkpoint path: pass one here or to EditingSession(checkpoint=...)")
        tensors, meta = self.state_dict()
        with atomic_write(target) as tmp:
            save_file(tensors, str(tmp), metadata={"prune_ext": json.dumps(meta)})
        if target == self.checkpoint:
            self.saved_edits = self.edits_done
        return target

    def _load(self, path: Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["prune_ext"])
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, this version reads "
                             f"{FORMAT_VERSION}: use another checkpoint path")
        variant = {"threshold_scale": 1.0, "protect_energy": None, "protect_damp": 1.0}  # defaults of older saves
        for key in ("restrain", "every", "alpha", "beta", "method", *variant):
            mine = getattr(self.schedule, key) if key in variant else getattr(self, key)
            if meta.get(key, variant.get(key)) != mine:
                raise ValueError(f"{path} was saved with {key}={meta.get(key, variant.get(key))!r}, this session "
                                 f"has {key}={mine!r}: use another checkpoint path")
        tensors = load_file(str(path))
        for name, info in meta["modules"].items():
            store = self._store(_get_weight(self.model, name))
            self.ledgers[name] = MatrixLedger.from_tensors(name, tensors, info["sigma_w"], info["compressed_rank"],
                                                           store)
        editor_state = {k.removeprefix("editor::"): v for k, v in tensors.items() if k.startswith("editor::")}
        if editor_state:
            self.editor.load_state_tensors(editor_state)
        self.edits_done, self.steps_done = meta["edits_done"], meta["steps_done"]
        self.finished, self.restraints = meta["finished"], meta["restraints"]
        self.edit_seconds = meta["edit_seconds"]
        if meta.get("prefixes") is not None and hasattr(self.editor, "_prefixes"):
            self.editor._prefixes = meta["prefixes"]
        torch.set_rng_state(tensors["__rng_state__"])
        self.saved_edits = self.edits_done
        # the model's edited weights follow from the books
        self.held = HELD_EDITED
        for name in self.ledgers:
            self._write(name)
        self.hold(meta["held"] == HELD_RESTRAINED)


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
