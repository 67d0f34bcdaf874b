"""PRUNE after the fact: restrain any edited checkpoint against its base model.

For every 2-D floating-point weight that differs between an edited model and its base,
ΔW = W_edited − W_base is restrained with σmax(W_base) (the paper's restraint, applied once) and
the weight becomes W_base + restrained ΔW. Whoever edited the model (EasyEdit, a fine-tune, a
merge) does not matter.

- :func:`restrain_model` works in place on an ``nn.Module`` or a state dict.
- :func:`restrain_folder` works on two Hugging Face folders (``model.safetensors`` or a sharded
  ``model.safetensors.index.json``) and writes a third with the same layout, dtype, index, config
  and tokenizer files. It streams: one tensor at a time is read (each through its own short-lived
  ``safetensors.safe_open``, so no whole file stays mapped) and the output shards are byte copies of
  the edited shards with the restrained matrices patched in place, written in a temporary folder
  that is renamed to the output only when everything succeeded.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import restraint
from .io import write_json
from .spectral import Restraint, apply_dense, dominant_subspace

__all__ = [
    "INDEX_NAME",
    "REPORT_NAME",
    "WEIGHTS_NAME",
    "MatrixReport",
    "PosthocError",
    "format_table",
    "restrain_folder",
    "restrain_model",
]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
REPORT_NAME = "prune_ext_restrain.json"
# weight files of other formats are not copied: they would hold the unrestrained weights
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")


class PosthocError(ValueError):
    """Bad input to a post-hoc restraint (reported as one line by the command line)."""


@dataclass(frozen=True)
class MatrixReport:
    """What the restraint did to one weight matrix.

    ``values_above`` singular values of ΔW exceeded ``sigma_w`` = σmax(W_base) and were restrained;
    ``kappa_before`` / ``kappa_after`` are κ of the edited and of the restrained weight (exact,
    float64); ``certified`` is the restraint's proof that no value above the threshold was missed.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    sigma_w: float
    delta_sigma_max: float
    values_above: int
    delta_sigma_max_after: float
    kappa_before: float
    kappa_after: float
    certified: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (κ = ∞ becomes the string "inf")."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        for key in ("kappa_before", "kappa_after"):
            out[key] = out[key] if math.isfinite(out[key]) else "inf"
        return out


def _globs(modules: str | Sequence[str] | None) -> list[str] | None:
    if modules is None:
        return None
    items = [m.strip() for m in modules.split(",")] if isinstance(modules, str) else [str(m) for m in modules]
    items = [m for m in items if m]
    return items or None


def _selected(name: str, globs: list[str] | None) -> bool:
    return globs is None or any(fnmatch.fnmatchcase(name, g) for g in globs)


def _restraint(fn: str, alpha: float, beta: float, variant: Mapping[str, Any]) -> Restraint:
    """The restraint with its spectral variant (threshold_scale, protect_energy, protect_damp), checked once."""
    try:
        spec = Restraint(fn, alpha, beta, **variant)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise PosthocError(str(exc)) from None
    if not spec.active:
        raise PosthocError("restrain='none' without protect_energy does nothing; give one or restrain='log'")
    return spec


def _restrain_matrix(
    name: str, edited: torch.Tensor, base: torch.Tensor, spec: Restraint, *, seed: int | None,
) -> tuple[torch.Tensor, MatrixReport]:
    """(restrained weight in ``edited``'s dtype, report) for one differing 2-D weight."""
    work = torch.float64 if torch.float64 in (edited.dtype, base.dtype) else torch.float32
    base_w = base.detach().to(work)
    delta = edited.detach().to(work) - base_w
    if not bool(torch.isfinite(delta).all()):
        raise PosthocError(f"{name}: ΔW = edited − base holds NaN or Inf")
    sigma_w = restraint.spectral_norm(base_w)
    if not (sigma_w > 0 and math.isfinite(sigma_w)):
        raise PosthocError(f"{name}: σmax of the base weight is {sigma_w}; nothing to restrain against")
    delta_sigma = restraint.spectral_norm(delta)
    # W's dominant subspace first (prune_ext.spectral), then F above c·σmax(W)
    sub = dominant_subspace(base_w, spec.protect_energy) if spec.protects else None  # type: ignore[arg-type]
    info, delta = apply_dense(delta, sigma_w, spec, subspace=sub, seed=seed, return_info=True)
    kappa_before = restraint.condition_number(edited)
    if spec.protects:
        new, after = (base_w + delta).to(edited.dtype), restraint.spectral_norm(delta)
        kappa_after = restraint.condition_number(new)
    elif info is not None and info.restrained:
        # F is increasing and F(σ) > t ≥ every value left alone: σmax after is F(σ₁)
        new, after = (base_w + delta).to(edited.dtype), float(info.sigma_after[0])
        kappa_after = restraint.condition_number(new)
    else:  # left bit-for-bit as it was
        new, after, kappa_after = edited, delta_sigma, kappa_before
    report = MatrixReport(
        name=name, shape=tuple(edited.shape), dtype=str(edited.dtype).removeprefix("torch."), sigma_w=sigma_w,
        delta_sigma_max=delta_sigma, values_above=info.restrained if info else 0, delta_sigma_max_after=after,
        kappa_before=kappa_before, kappa_after=kappa_after, certified=info.certified if info else True,
    )
    return new, report


def _is_matrix(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.dtype.is_floating_point


# ---------------------------------------------------------------------------------------------
# in memory


def _tensors(obj: nn.Module | Mapping[str, torch.Tensor], what: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(f"{what} must be an nn.Module or a state dict, got {type(obj).__name__}")


def restrain_model(
    base: nn.Module | Mapping[str, torch.Tensor],
    edited: nn.Module | MutableMapping[str, torch.Tensor],
    *,
    restrain: str = "log",
    alpha: float = 1.2,
    beta: float = 2.0,
    modules: str | Sequence[str] | None = None,
    seed: int | None = None,
    threshold_scale: float = 1.0,
    protect_energy: float | None = None,
    protect_damp: float = 1.0,
) -> list[MatrixReport]:
    """Restrain ``edited`` against ``base`` in place; returns one report per changed matrix.

    The same argument order and names as :func:`restrain_folder`: the base model first.

    Every 2-D floating-point tensor of ``edited`` that differs from ``base`` (and whose name matches
    one of the ``modules`` globs, e.g. ``"*.mlp.down_proj.weight"``; default all) becomes
    W_base + restrained (W_edited − W_base), with PRUNE's F (``restrain`` ``"log"`` with ``alpha`` or
    ``"linear"`` with ``beta``) and the threshold σmax(W_base). Arithmetic is float32 (float64 if
    either weight is float64); the result keeps ``edited``'s dtype. Tied weights are restrained
    once. Raises :class:`PosthocError` if the two do not have the same tensors and shapes, or if a
    ΔW holds NaN or Inf (checked before anything is written: nothing changes then).

    ``threshold_scale``, ``protect_energy``, ``protect_damp``: the spectral variants of
    :class:`prune_ext.spectral.Restraint` (F above ``threshold_scale`` · σmax(W_base); first damp ΔW's
    component in W_base's dominant singular subspaces); the defaults are PRUNE.
    """
    variant = {"threshold_scale": threshold_scale, "protect_energy": protect_energy, "protect_damp": protect_damp}
    spec = _restraint(restrain, alpha, beta, variant)
    globs = _globs(modules)
    ed, bs = _tensors(edited, "edited"), _tensors(base, "base")
    _check_same_layout({k: (str(v.dtype), tuple(v.shape)) for k, v in ed.items()},
                       {k: (str(v.dtype), tuple(v.shape)) for k, v in bs.items()})
    todo, seen = [], set()
    for name, tensor in ed.items():
        ptr = tensor.data_ptr() if tensor.numel() else None
        if not _is_matrix(tensor) or not _selected(name, globs) or ptr in seen:
            continue
        seen.add(ptr)
        if not torch.equal(tensor, bs[name].to(tensor.device)):
            todo.append(name)
    if globs is not None and not any(_selected(n, globs) for n, t in ed.items() if _is_matrix(t)):
        raise PosthocError(f"--modules {','.join(globs)} matches no 2-D weight")
    results = []
    for name in todo:  # all results first, so that a NaN found late leaves the model untouched
        results.append(_restrain_matrix(name, ed[name], bs[name].to(ed[name].device), spec, seed=seed))
    with torch.no_grad():
        for name, (new, _) in zip(todo, results):
            if new is not ed[name]:
                ed[name].copy_(new)  # in place: a model's state dict shares its parameters' storage
    return [report for _, report in results]


def _check_same_layout(edited: Mapping[str, tuple[str, tuple]], base: Mapping[str, tuple[str, tuple]]) -> None:
    only_e, only_b = sorted(set(edited) - set(base)), sorted(set(base) - set(edited))
    if only_e or only_b:
        parts = []
        if only_e:
            parts.append(f"{len(only_e)} tensor(s) only in the edited model (e.g. {only_e[0]})")
        if only_b:
            parts.append(f"{len(only_b)} only in the base (e.g. {only_b[0]})")
        raise PosthocError("mismatched architectures: " + ", ".join(parts))
    for name in edited:
        (dt_e, sh_e), (dt_b, sh_b) = edited[name], base[name]
        if sh_e != sh_b:
            raise PosthocError(f"mismatched shapes: {name} is {list(sh_e)} in the edited model, "
                               f"{list(sh_b)} in the base")
        if dt_e != dt_b:
            raise PosthocError(f"mismatched dtypes: {name} is {dt_e} in the edited model, {dt_b} in the base "
                               "(save both in the same dtype)")


# ---------------------------------------------------------------------------------------------
# folders


@dataclass(frozen=True)
class _Entry:
    file: str  # shard file name
    dtype: str  # safetensors dtype code (F32, BF16, ...)
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


_FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


def _read_header(path: Path) -> dict[str, _Entry]:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise PosthocError(f"{path}: not a readable safetensors file ({exc})") from None
    start = 8 + size
    return {
        name: _Entry(path.name, info["dtype"], tuple(info["shape"]), start + info["data_offsets"][0],
                     start + info["data_offsets"][1])
        for name, info in header.items() if name != "__metadata__"
    }


class _Checkpoint:
    """The safetensors weights of one Hugging Face folder: files, and where every tensor is."""

    def __init__(self, folder: str | os.PathLike[str], what: str) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise PosthocError(f"--{what} {folder}: no such folder")
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise PosthocError(f"{index}: not a safetensors index ({exc})") from None
            self.files = sorted(set(weight_map.values()))
            self.index: Path | None = index
        elif (self.folder / WEIGHTS_NAME).is_file():
            self.files, self.index = [WEIGHTS_NAME], None
        else:
            raise PosthocError(f"--{what} {folder}: missing files: neither {WEIGHTS_NAME} nor {INDEX_NAME}")
        self.entries: dict[str, _Entry] = {}
        for name in self.files:
            if not (self.folder / name).is_file():
                raise PosthocError(f"--{what} {folder}: missing files: shard {name} named in {INDEX_NAME}")
            self.entries.update(_read_header(self.folder / name))
        if self.index is not None:
            stray = sorted(set(weight_map) - set(self.entries))
            if stray:
                raise PosthocError(f"{index}: names {stray[0]} but no shard holds it")

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        # one short-lived handle per tensor: a handle maps its whole file, and pages read through a
        # long-lived one stay resident, which would make the process as large as the model
        with safe_open(str(self.folder / self.entries[name].file), framework="pt") as f:
            return f.get_tensor(name)

    def config(self) -> dict[str, Any] | None:
        path = self.folder / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None


def _check_configs(base: _Checkpoint, edited: _Checkpoint) -> None:
    cb, ce = base.config(), edited.config()
    if cb is None or ce is None:
        return
    for key in ("model_type", "architectures"):
        if cb.get(key) != ce.get(key):
            raise PosthocError(f"mismatched architectures: config.json {key} is {ce.get(key)!r} in the edited "
                               f"model, {cb.get(key)!r} in the base")


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _write_at(path: Path, offset: int, tensor: torch.Tensor) -> None:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data.data)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def restrain_folder(
    base: str | os.PathLike[str],
    edited: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    restrain: str = "log",
    alpha: float = 1.2,
    beta: float = 2.0,
    modules: str | Sequence[str] | None = None,
    seed: int | None = None,
    log: Callable[[str], Any] | None = None,
    threshold_scale: float = 1.0,
    protect_energy: float | None = None,
    protect_damp: float = 1.0,
) -> list[MatrixReport]:
    """Restrain the Hugging Face folder ``edited`` against ``base`` and write the result to ``out``.

    ``out`` gets the edited folder's layout (the same shards, index and dtype; its config,
    tokenizer and other small files copied; weight files of other formats left out) with every
    differing 2-D weight restrained as in :func:`restrain_model`, and ``prune_ext_restrain.json``
    (the per-matrix reports). Memory is bounded by a few matrices whatever the model's size. Bad
    input (missing files, different tensors, shapes or dtypes, NaN/Inf in a ΔW, ``out`` equal to
    an input or already there) raises :class:`PosthocError` and writes nothing. The spectral variants
    (``threshold_scale``, ``protect_energy``, ``protect_damp``) are those of :func:`restrain_model`.
    """
    variant = {"threshold_scale": threshold_scale, "protect_energy": protect_energy, "protect_damp": protect_damp}
    spec = _restraint(restrain, alpha, beta, variant)
    globs = _globs(modules)
    out_path = Path(out)
    b, e = _Checkpoint(base, "base"), _Checkpoint(edited, "edited")
    for what, folder in (("--base", b.folder), ("--edited", e.folder)):
        if _same_path(out_path, folder):
            raise PosthocError(f"--out {out} is the same folder as {what}: write the result elsewhere")
    if out_path.exists():
        raise PosthocError(f"--out {out} already exists: remove it or choose another folder")
    _check_same_layout({k: (v.dtype, v.shape) for k, v in e.entries.items()},
                       {k: (v.dtype, v.shape) for k, v in b.entries.items()})
    _check_configs(b, e)
    matrices = [n for n, v in e.entries.items() if len(v.shape) == 2 and v.dtype in _FLOAT_CODES]
    if globs is not None and not any(_selected(n, globs) for n in matrices):
        raise PosthocError(f"--modules {','.join(globs)} matches no 2-D weight")
    say = log or (lambda _msg: None)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent))
    try:
        for item in sorted(e.folder.iterdir()):  # config, tokenizer, index, ... (not other weights)
            if item.is_file() and not item.name.endswith(_OTHER_WEIGHTS):
                shutil.copy2(item, tmp / item.name)
        reports: list[MatrixReport] = []
        other_changed: list[str] = []
        for shard in e.files:
            shutil.copyfile(e.folder / shard, tmp / shard)  # byte copy; restrained matrices patched in
            names = sorted((n for n, v in e.entries.items() if v.file == shard), key=lambda n: e.entries[n].begin)
            for name in names:
                entry = e.entries[name]
                if name not in matrices:
                    if not _same_bytes(e, b, name):
                        other_changed.append(name)
                    continue
                if not _selected(name, globs) or _same_bytes(e, b, name):
                    continue
                w_edit, w_base = e.tensor(name), b.tensor(name)
                if torch.equal(w_edit, w_base):  # other bytes, same values (-0.0 and 0.0)
                    continue
                new, report = _restrain_matrix(name, w_edit, w_base, spec, seed=seed)
                reports.append(report)
                say(_row(report))
                if new is not w_edit:
                    _write_at(tmp / shard, entry.begin, new)
                del w_edit, w_base, new
        summary = {
            "base": str(b.folder), "edited": str(e.folder), "restrain": restrain, "alpha": alpha, "beta": beta,
            **variant,
            "modules": globs, "matrices": [r.as_dict() for r in reports],
            "other_changed": other_changed,  # differing tensors that are not 2-D weights: copied as edited
        }
        write_json(tmp / REPORT_NAME, summary)
        _fsync_tree(tmp)
        os.rename(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return reports


def _same_bytes(a: _Checkpoint, b: _Checkpoint, name: str, chunk: int = 1 << 22) -> bool:
    """Whether ``name`` is stored with the same bytes in both checkpoints (read 4 MiB at a time, so
    an unchanged matrix is never loaded whole; -0.0 vs 0.0 or NaN payloads count as changes)."""
    ea, eb = a.entries[name], b.entries[name]
    with open(a.folder / ea.file, "rb") as fa, open(b.folder / eb.file, "rb") as fb:
        fa.seek(ea.begin)
        fb.seek(eb.begin)
        left = ea.end - ea.begin
        while left > 0:
            n = min(chunk, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


# ---------------------------------------------------------------------------------------------
# the table


_HEADER = ("matrix", "shape", "σmax(W)", "σmax(ΔW)", "> σmax(W)", "σmax(ΔW')", "κ before", "κ after")


def _row(r: MatrixReport) -> str:
    return (f"{r.name}  {'x'.join(map(str, r.shape))}  σmax(W)={r.sigma_w:.4g}  σmax(ΔW)={r.delta_sigma_max:.4g}"
            f"  above={r.values_above}  κ {r.kappa_before:.4g} → {r.kappa_after:.4g}")


def format_table(reports: Iterable[MatrixReport]) -> str:
    """A Markdown table of the reports (one row per restrained matrix)."""
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    for r in reports:
        cells = (r.name, "×".join(map(str, r.shape)), f"{r.sigma_w:.4g}", f"{r.delta_sigma_max:.4g}",
                 str(r.values_above), f"{r.delta_sigma_max_after:.4g}", f"{r.kappa_before:.4g}", f"{r.kappa_after:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
