"""A run's edits as artifacts: a PEFT LoRA adapter, or a full Hugging Face model folder.

A run folder (written by ``prune-ext run``) holds ``config.json`` (``"model"``: ``"smollm2-135m"`` or a
local Hugging Face folder, loadable by :func:`prune_ext.editing.load_model`) and
``weights.safetensors``: the final evaluated edited matrices under their parameter names, in the
model's dtype. ``export_*`` reload the base model and

- :func:`export_lora`: factor ΔW = W_edited − W_base of every edited matrix exactly (SVD in float64,
  rank = the numerical rank: singular values above 1e-6 σ₁, and above the rounding of W_edited's
  dtype) as a LoRA adapter with scaling 1 (``lora_alpha = r`` per module), so that
  ``PeftModel.from_pretrained(base, DIR)`` computes the edited model; GPT-2's Conv1D is handled with
  ``fan_in_fan_out``;
- :func:`export_hf`: write the edited model as a plain safetensors folder that
  ``AutoModelForCausalLM.from_pretrained`` loads (for the GGUF-loaded SmolLM2 too: the model is
  rebuilt from its config without ``quantization_config``).

Both write into a temporary folder beside the target and rename it when complete. ``peft`` is
imported only by :func:`export_lora`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import write_json

__all__ = [
    "EXPORT_INFO",
    "RUN_WEIGHTS",
    "ExportError",
    "export_hf",
    "export_lora",
    "lora_factors",
    "lora_factors_of",
    "read_run",
    "save_hf_folder",
    "write_lora_adapter",
]

RUN_WEIGHTS = "weights.safetensors"
EXPORT_INFO = "prune_ext_export.json"
LORA_RTOL = 1e-6


class ExportError(ValueError):
    """A run that cannot be exported as asked (reported as one line by the command line)."""


# ---------------------------------------------------------------------------------------------
# the run


def _same_folder(a: Path, b: str) -> bool:
    return a.resolve() == Path(b).resolve()


def _holds_restrained(folder: Path, config: dict[str, Any], metadata: dict[str, str]) -> bool:
    """Whether the run folder holds the restrained weights W'_N (else W_N)."""
    if metadata.get("restrained") in ("true", "false"):  # the weights file says so itself
        return metadata["restrained"] == "true"
    if config.get("restrain", "none") == "none":
        return False
    plain = config.get("unrestrained_out")  # a run with both variants writes the same config to both
    if plain:
        if _same_folder(folder, plain):
            return False
        out = config.get("out")
        if Path(plain).name == folder.name and not (out and Path(out).name == folder.name):
            return False  # the folder was moved: go by its name
    return True


def read_run(run: str | os.PathLike[str], restrained: bool | None = None
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor], bool]:
    """(config, edited weights by parameter name, whether they are the restrained ones) of a run.

    ``restrained`` (if not None) is checked against what the run holds: a run with ``restrain``
    ``"none"`` and the ``unrestrained_out`` folder of a run with both variants hold unrestrained
    weights, every other run the restrained ones.
    """
    from safetensors import safe_open

    folder = Path(run)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{run}: not a prune-ext run folder (no config.json)")
    if not (folder / RUN_WEIGHTS).is_file():
        raise ExportError(f"{run}: no {RUN_WEIGHTS} (the final edited weights): finish the run first")
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as exc:
        raise ExportError(f"{folder / 'config.json'}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise ExportError(f"{folder / 'config.json'}: no \"model\" entry")
    try:
        with safe_open(str(folder / RUN_WEIGHTS), framework="pt") as f:
            metadata = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ExportError(f"{folder / RUN_WEIGHTS}: unreadable ({exc})") from None
    if not weights:
        raise ExportError(f"{folder / RUN_WEIGHTS} holds no weights")
    holds = _holds_restrained(folder, config, metadata)
    if restrained is not None and restrained != holds:
        have, asked = ("restrained", "--unrestrained") if holds else ("unrestrained", "--restrained")
        why = f"restrain={config.get('restrain', 'none')!r}" + (", it is the unrestrained_out folder"
                                                                 if not holds and config.get("restrain") != "none"
                                                                 else "")
        raise ExportError(f"{asked}: {run} holds the {have} weights ({why})")
    return config, weights, holds


def _base_model(config: dict[str, Any], weights: dict[str, torch.Tensor]) -> tuple[nn.Module, Any]:
    from .editing import load_model

    dtypes = {w.dtype for w in weights.values()}
    if len(dtypes) != 1:
        raise ExportError(f"{RUN_WEIGHTS} mixes dtypes {sorted(map(str, dtypes))}")
    model, tok = load_model(config["model"], dtype=dtypes.pop())
    params = dict(model.named_parameters())
    for name, w in weights.items():
        if name not in params:
            raise ExportError(f"{RUN_WEIGHTS}: {name} is not a parameter of {config['model']}")
        if tuple(params[name].shape) != tuple(w.shape):
            raise ExportError(f"{RUN_WEIGHTS}: {name} is {list(w.shape)}, the model's is "
                              f"{list(params[name].shape)}")
    return model, tok


@contextmanager
def _atomic_folder(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` on success and removed on failure."""
    target = Path(out)
    if target.exists():
        raise ExportError(f"{out} already exists: remove it or choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_info(folder: Path, run: str | os.PathLike[str], config: dict[str, Any], restrained: bool,
                **extra: Any) -> None:
    info = {"run": str(run), "model": config["model"], "restrained": restrained, **extra}
    write_json(folder / EXPORT_INFO, info)


# ---------------------------------------------------------------------------------------------
# LoRA


def lora_factors(delta: torch.Tensor, *, rtol: float = LORA_RTOL, atol: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A = ``delta`` (out × in) to its numerical rank, from an SVD in float64.

    The rank counts singular values above ``max(rtol · σ₁, atol)``; B = U√S and A = √S Vᵀ (balanced,
    float64). A zero matrix gives rank 0.
    """
    U, S, Vh = torch.linalg.svd(delta.detach().to(torch.float64), full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return U[:, :0], Vh[:0]
    r = int((S > max(rtol * S[0].item(), atol)).sum())
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


def lora_factors_of(
    model: nn.Module,
    edited: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    *,
    rtol: float = LORA_RTOL,
    rank: int | None = None,
    log: Callable[[str], Any] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module name: LoRA factors (B, A) of ΔW = ``edited[name]`` − ``base[name]`` (float64, in the
    ``nn.Linear`` layout out × in; GPT-2's Conv1D weights are transposed first). Modules whose ΔW is zero
    to the rounding of ``edited``'s dtype are left out. The rank is the numerical rank (see
    :func:`export_lora`), or at most ``rank`` (the best rank-``rank`` approximation, an SVD truncation)."""
    from .editing.models import weight_is_transposed

    say = log or (lambda _msg: None)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, new in edited.items():
        module = model.get_submodule(name)
        is_conv1d = weight_is_transposed(module)
        if not (isinstance(module, nn.Linear) or is_conv1d):
            raise ExportError(f"{name}.weight: a LoRA adapter holds nn.Linear (or GPT-2 Conv1D) weights only; "
                              "export a full model instead (--hf, EditingSession.save_pretrained)")
        delta = new.detach().to(torch.float64).cpu() - base[name].detach().to(torch.float64).cpu()
        if not bool(torch.isfinite(delta).all()):
            raise ExportError(f"{name}.weight: ΔW holds NaN or Inf")
        floor = 0.5 * torch.finfo(new.dtype).eps * new.detach().to(torch.float64).norm().item()
        B, A = lora_factors(delta.T if is_conv1d else delta, rtol=rtol, atol=floor)
        if rank is not None and B.shape[1] > rank:
            B, A = B[:, :rank], A[:rank]
        if B.shape[1] == 0:
            say(f"{name}: unchanged, left out")
            continue
        factors[name] = (B, A)
        say(f"{name}: rank {B.shape[1]}")
    return factors


def write_lora_adapter(
    model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], out: str | os.PathLike[str],
    info: dict[str, Any],
) -> dict[str, int]:
    """Write ``factors`` (module name → (B, A), ``B @ A`` = ΔW out × in) as a PEFT LoRA adapter folder for
    ``model``'s architecture, atomically, with ``info`` in ``prune_ext_export.json``; returns the ranks.

    Scaling 1 (``lora_alpha`` = r; per-module ``rank_pattern`` / ``alpha_pattern`` when ranks differ),
    float32, ``fan_in_fan_out`` for GPT-2's Conv1D. PEFT wraps a weightless (meta-device) copy of the
    architecture, so ``model`` itself is neither changed nor copied.
    """
    from .editing.models import weight_is_transposed
    from .extras import require

    require("peft", "a LoRA adapter")
    from peft import LoraConfig, get_peft_model

    if not factors:
        raise ExportError("there is no edit to export: the edited weights equal the base model's")
    if Path(out).exists():
        raise ExportError(f"{out} already exists: remove it or choose another folder")
    transposed = {name for name in factors if weight_is_transposed(model.get_submodule(name))}
    if transposed and len(transposed) != len(factors):
        raise ExportError("the edited matrices mix Conv1D and nn.Linear layers; one LoRA config cannot hold both")
    ranks = {name: B.shape[1] for name, (B, _) in factors.items()}
    r = max(ranks.values())
    differ = {name: k for name, k in ranks.items() if k != r}
    lora_config = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(factors), rank_pattern=differ, alpha_pattern=dict(differ),
        lora_dropout=0.0, bias="none", fan_in_fan_out=bool(transposed), task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(_skeleton(model), lora_config)
    for name, (B, A) in factors.items():
        layer = peft_model.base_model.model.get_submodule(name)
        if layer.scaling["default"] != 1.0:
            raise ExportError(f"{name}: PEFT set the LoRA scaling to {layer.scaling['default']}, not 1")
        for holder, value in ((layer.lora_A["default"], A), (layer.lora_B["default"], B)):
            if tuple(holder.weight.shape) != tuple(value.shape):
                raise ExportError(f"{name}: PEFT made a LoRA factor of shape {tuple(holder.weight.shape)}, "
                                  f"the edit's is {tuple(value.shape)}")
            holder.weight = nn.Parameter(value.to(torch.float32).contiguous(), requires_grad=False)
    with _atomic_folder(out) as tmp:
        peft_model.save_pretrained(tmp)
        write_json(tmp / EXPORT_INFO, {**info, "ranks": ranks})
    return ranks


def _skeleton(model: nn.Module) -> nn.Module:
    """A weightless (meta-device) model of ``model``'s architecture and module names, from its config
    (without ``quantization_config``: a GGUF-loaded model's architecture is the plain one)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def export_lora(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    restrained: bool | None = None,
    rtol: float = LORA_RTOL,
    log: Callable[[str], Any] | None = None,
) -> Path:
    """Write the run's edit as a PEFT LoRA adapter folder ``out``; returns ``out``.

    One LoRA pair per edited matrix, ``lora_B @ lora_A`` = ΔW in the ``nn.Linear`` layout
    (out × in; ``fan_in_fan_out`` for GPT-2's Conv1D), scaling 1 (``lora_alpha`` = r; per-module
    ``rank_pattern`` / ``alpha_pattern`` when the ranks differ), float32. The rank is the numerical
    rank of ΔW: singular values above ``rtol`` σ₁ and above the rounding of the edited weights' dtype
    (half a unit in the last place of every entry, at most (ε/2)‖W_edited‖_F). ``restrained`` is
    checked against what the run holds (see :func:`read_run`).
    """
    from .extras import require

    require("peft", "prune-ext export --lora")
    say = log or (lambda _msg: None)
    config, weights, holds = read_run(run, restrained)
    if Path(out).exists():
        raise ExportError(f"{out} already exists: remove it or choose another folder")
    model, _ = _base_model(config, weights)
    for name in weights:
        if not name.endswith(".weight"):
            raise ExportError(f"{name}: a LoRA adapter holds nn.Linear (or GPT-2 Conv1D) weights only; "
                              "export a full model instead (--hf)")
    edited = {name.removesuffix(".weight"): w for name, w in weights.items()}
    base = {name: model.get_submodule(name).weight for name in edited}
    factors = lora_factors_of(model, edited, base, rtol=rtol, log=say)
    if not factors:
        raise ExportError(f"{run}: the edited weights equal the base model's; there is no edit to export")
    ranks = write_lora_adapter(model, factors, out, {"run": str(run), "model": config["model"], "restrained": holds})
    say(f"wrote the LoRA adapter ({len(factors)} module(s), ranks {sorted(set(ranks.values()))}) to {out}")
    return Path(out)


# ---------------------------------------------------------------------------------------------
# full folder


def _plain_model(model: nn.Module) -> nn.Module:
    """``model`` itself, or for a GGUF (quantization-config) model an equivalent plain one that shares
    its tensors (built on the meta device, so no second copy of the weights is made)."""
    if getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None:
        return model
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary frequencies, ...)
        owner, _, attr = name.rpartition(".")
        target = plain.get_submodule(owner) if owner else plain
        if attr in target._buffers and target._buffers[attr] is not None and target._buffers[attr].is_meta:
            target._buffers[attr] = buffer
    plain.tie_weights()
    return plain.eval()


def save_hf_folder(model: nn.Module, tokenizer: Any, out: str | os.PathLike[str],
                   extra: Callable[[Path], Any] | None = None) -> Path:
    """Save ``model`` (and ``tokenizer``) as a plain Hugging Face safetensors folder, atomically;
    ``extra(folder)`` may add files before the folder is renamed into place.

    Works for the GGUF-loaded SmolLM2 too (whose ``save_pretrained`` refuses): it is saved from a
    plain model of the same config without ``quantization_config``.
    """
    with _atomic_folder(out) as tmp:
        _plain_model(model).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return Path(out)


def export_hf(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    restrained: bool | None = None,
    log: Callable[[str], Any] | None = None,
) -> Path:
    """Write the run's edited model as a full Hugging Face folder ``out`` (safetensors, tokenizer,
    plain config); ``restrained`` is checked against what the run holds (see :func:`read_run`)."""
    say = log or (lambda _msg: None)
    config, weights, holds = read_run(run, restrained)
    if Path(out).exists():
        raise ExportError(f"{out} already exists: remove it or choose another folder")
    model, tok = _base_model(config, weights)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
    save_hf_folder(model, tok, out, extra=lambda tmp: _write_info(tmp, run, config, holds, edited=sorted(weights)))
    say(f"wrote the edited model ({len(weights)} edited matrices, {'restrained' if holds else 'unrestrained'}) "
        f"to {out}")
    return Path(out)
