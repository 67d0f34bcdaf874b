"""EasyEdit's ROME / MEMIT / AlphaEdit hyper-parameter YAML files, read into prune_ext overrides.

:func:`read_easyedit_hparams` returns ``(method, overrides)``: the editor (``"rome"``, ``"memit"`` or
``"alphaedit"``) and a dict of :class:`~prune_ext.editing.hparams.RomeHyperParams` /
:class:`~prune_ext.editing.hparams.MemitHyperParams` fields (AlphaEdit: MEMIT's plus
``nullspace_threshold``, and ``L2`` as ``l2``) to pass as ``hparams=`` to ``make_editor``. Values are plain
JSON types (lists, not tuples), so a run's ``config.json`` round-trips them.

Every field EasyEdit defines is either mapped (``FIELD_MAP``), used for a check (``CHECKED``), a
placement (``PLACEMENT``: ``device`` and ``fp16``, read by :func:`easyedit_settings`) or accepted and
ignored for a stated reason (``IGNORED``); anything else is an error naming it.

The file's ``alg_name`` chooses the editor when none is given. Placement: ``prune-ext run`` loads the
model on the file's ``device`` (``N`` → ``cuda:N``; refused with one line when torch sees no CUDA device)
and in float16 when ``fp16: true``, unless ``--device`` / ``--dtype`` say otherwise (the command line
wins). In Python the model is already loaded: a file whose ``device``/``fp16`` disagree with it gives a
warning (the model's placement is used), never silence.
Semantics that differ: EasyEdit's ``mom2_n_samples`` counts Wikipedia documents (each up to the
model's context), prune_ext's counts key vectors (tokens), so the same number means far fewer
keys here; statistics come from ``--corpus`` or the model's own samples, never from a download.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "CHECKED", "FIELD_MAP", "IGNORED", "PLACEMENT", "EasyEditSettings", "HParamsError", "easyedit_settings",
    "read_easyedit_hparams",
]

_METHODS = {"rome": "rome", "memit": "memit", "alphaedit": "alphaedit"}  # alg_name.lower() → editor
_ALG_NAMES = {"rome": "ROME", "memit": "MEMIT", "alphaedit": "AlphaEdit"}

# EasyEdit field → prune_ext field, per editor ("layers" is ROME's "layer", a single one)
_SHARED = {
    "v_num_grad_steps": "v_num_grad_steps",
    "v_lr": "v_lr",
    "v_weight_decay": "v_weight_decay",
    "clamp_norm_factor": "clamp_norm_factor",
    "kl_factor": "kl_factor",
    "mom2_adjustment": "mom2_adjustment",
    "mom2_n_samples": "mom2_n_samples",
    "context_template_length_params": "context_lengths",
    "rewrite_module_tmp": "module_template",
}
_MEMIT = {**_SHARED, "layers": "layers", "layer_module_tmp": "block_template",
          "mom2_update_weight": "mom2_update_weight"}
FIELD_MAP: dict[str, dict[str, str]] = {
    "rome": {**_SHARED, "layers": "layer"},
    "memit": _MEMIT,
    "alphaedit": {**_MEMIT, "nullspace_threshold": "nullspace_threshold", "L2": "l2"},
}

CHECKED: dict[str, str] = {
    "alg_name": "must name the editor (ROME, MEMIT or AlphaEdit)",
    "fact_token": "must be subject_last: prune_ext takes keys and values at the subject's last token",
    "layer_selection": "must be all (every listed layer is edited)",
    "v_loss_layer": "must be the model's last layer: the loss is taken at the model's output",
    "mlp_module_tmp": "must contain rewrite_module_tmp: δ goes to the output of the MLP's output matrix",
    "layer_module_tmp": "ROME: the block of v_loss_layer (checked against the model)",
}

PLACEMENT: dict[str, str] = {
    "device": "N loads the model on cuda:N (--device wins; Python: a warning if the model is elsewhere)",
    "fp16": "true loads the model in float16 (--dtype wins; Python: a warning if the model is not float16)",
}

IGNORED: dict[str, str] = {
    "model_name": "the model is --model (or the model object)",
    "model_parallel": "the model's own device map is used (--device-map)",
    "stats_dir": "statistics are cached in prune_ext's cache folder ($PRUNE_EXT_CACHE)",
    "mom2_dataset": "statistics come from --corpus or the model's own samples (nothing is downloaded)",
    "mom2_dtype": "statistics are float32 products summed in float64",
    "max_length": "EasyEdit's evaluation length, not an editing parameter",
    "attn_module_tmp": "not used by EasyEdit's ROME, MEMIT or AlphaEdit updates",
    "ln_f_module": "the loss uses the model's own final norm",
    "lm_head_module": "the loss uses the model's own output head",
    "P_loc": "AlphaEdit's cache file of the null-space projection; prune_ext computes it from the statistics",
}
_ROME_IGNORED = {"mom2_update_weight": "ROME's update does not depend on the scale of C"}

_INT = {"v_num_grad_steps", "mom2_n_samples", "v_loss_layer"}
_FLOAT = {"v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_update_weight", "nullspace_threshold",
          "L2"}
_SMOLLM2_LAYERS = 30  # SmolLM2-135M's depth (reading it from the GGUF header takes seconds)


class HParamsError(ValueError):
    """A hyper-parameter file that cannot be used as it is (one line, naming the field)."""


def _number(path: Path, key: str, value: Any, kind: type) -> int | float:
    if isinstance(value, str):  # PyYAML reads 5e-1 as a string; EasyEdit converts such strings too
        try:
            value = float(value)
        except ValueError:
            raise HParamsError(f"{path}: {key}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HParamsError(f"{path}: {key}: expected a number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise HParamsError(f"{path}: {key}: expected a whole number, got {value!r}")
        return int(value)
    return float(value)


def _template(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or value.count("{}") != 1:
        raise HParamsError(f"{path}: {key}: expected a module name with one '{{}}' for the layer, got {value!r}")
    return value


def _layers(path: Path, value: Any) -> list[int]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise HParamsError(f"{path}: layers: empty")
    return [_number(path, "layers", v, int) for v in items]


def _context(path: Path, value: Any) -> list[list[int]]:
    ok = isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value)
    if not ok:
        raise HParamsError(f"{path}: context_template_length_params: expected [[tokens, count], ...], got {value!r}")
    return [[_number(path, "context_template_length_params", v, int) for v in p] for p in value]


def _depth(model: nn.Module | str | os.PathLike[str] | None) -> int | None:
    """The number of transformer blocks of ``model`` (a module, 'smollm2-135m' or a local folder)."""
    if model is None:
        return None
    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        layers = {k: getattr(config, k, None) for k in ("num_hidden_layers", "n_layer", "num_layers")}
    else:
        from .models import _SMOLLM2_NAMES

        if str(model).lower() in _SMOLLM2_NAMES:
            return _SMOLLM2_LAYERS
        file = Path(model) / "config.json"
        if not file.is_file():
            return None
        layers = json.loads(file.read_text())
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(layers.get(key), int):
            return layers[key]
    return None


def read_easyedit_hparams(
    path: str | os.PathLike[str],
    editor: str | None = None,
    *,
    model: nn.Module | str | os.PathLike[str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Read an EasyEdit ROME / MEMIT / AlphaEdit YAML file; returns ``(method, overrides)``.

    Args:
        path: the YAML file (as in EasyEdit's ``hparams/ROME/*.yaml`` and so on).
        editor: if given, the file's ``alg_name`` must name this editor.
        model: the model (module) or its name (``"smollm2-135m"`` or a local folder), for the checks
            that need its depth (``v_loss_layer``, the layer numbers) and, for a module, that the
            templates name its modules.

    Raises :class:`HParamsError` (one line naming the field) for an unsupported field or value.
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise HParamsError(f"--hparams {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise HParamsError(f"{file}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise HParamsError(f"{file}: expected a mapping of EasyEdit fields, got {type(data).__name__}")
    alg = data.get("alg_name")
    method = _METHODS.get(str(alg).lower()) if isinstance(alg, str) else None
    if method is None:
        raise HParamsError(f"{file}: alg_name: expected ROME, MEMIT or AlphaEdit, got {alg!r}")
    if editor is not None and editor != method:
        raise HParamsError(f"{file}: alg_name {alg!r} does not match the editor {editor!r} (use --editor {method})")
    mapping = FIELD_MAP[method]
    ignored = {**IGNORED, **(_ROME_IGNORED if method == "rome" else {})}
    unknown = sorted(k for k in data if k not in mapping and k not in CHECKED and k not in ignored
                     and k not in PLACEMENT)
    if unknown:
        hint = " (set the batch with --batch-size or apply_edits(batch_size=...))" if "batch_size" in unknown else ""
        raise HParamsError(f"{file}: field(s) not supported by prune_ext's {_ALG_NAMES[method]}: "
                           f"{', '.join(unknown)}{hint}")

    overrides: dict[str, Any] = {}
    for key, ours in mapping.items():
        if key not in data:
            continue
        value = data[key]
        if key == "layers":
            layers = _layers(file, value)
            if method == "rome" and len(layers) != 1:
                raise HParamsError(f"{file}: layers: prune_ext's ROME edits one layer, got {layers} (use MEMIT)")
            value = layers[0] if method == "rome" else layers
        elif key == "context_template_length_params":
            value = _context(file, value)
        elif key.endswith("_tmp"):
            value = _template(file, key, value)
        elif key == "mom2_adjustment":
            if not isinstance(value, bool):
                raise HParamsError(f"{file}: mom2_adjustment: expected true or false, got {value!r}")
        elif key in _INT or key in _FLOAT:
            value = _number(file, key, value, int if key in _INT else float)
        overrides[ours] = value
    _checks(file, method, data, overrides, model)
    placement = _placement(file, data)
    if isinstance(model, nn.Module):
        _warn_placement(file, placement, model)
    return method, overrides


@dataclass(frozen=True)
class EasyEditSettings:
    """What an EasyEdit file says besides hyper-parameters: the editor (from ``alg_name``), and the
    device (``"cuda:N"``, ``"cpu"``) and dtype (``"float16"``) to load the model with, or ``None``."""

    editor: str
    device: str | None
    dtype: str | None


def easyedit_settings(path: str | os.PathLike[str]) -> EasyEditSettings | None:
    """The editor and placement an EasyEdit file asks for; ``None`` if ``path`` is not an EasyEdit file
    (no ``alg_name``). Raises :class:`HParamsError` for a bad ``alg_name``, ``device`` or ``fp16``."""
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HParamsError(f"--hparams {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise HParamsError(f"{file}: not valid JSON/YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or "alg_name" not in data:
        return None
    alg = data["alg_name"]
    method = _METHODS.get(str(alg).lower()) if isinstance(alg, str) else None
    if method is None:
        raise HParamsError(f"{file}: alg_name: expected ROME, MEMIT or AlphaEdit, got {alg!r}")
    placement = _placement(file, data)
    return EasyEditSettings(method, placement.get("device"), placement.get("dtype"))


def _placement(file: Path, data: dict[str, Any]) -> dict[str, str]:
    """``device`` → ``{"device": "cuda:N" | "cpu" | ...}``, ``fp16: true`` → ``{"dtype": "float16"}``."""
    out: dict[str, str] = {}
    if data.get("device") is not None:
        value = data["device"]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise HParamsError(f"{file}: device: expected a GPU number or a device name, got {value!r}")
        device = f"cuda:{value}" if isinstance(value, int) or value.isdigit() else value
        import torch

        try:
            torch.device(device)
        except RuntimeError:
            raise HParamsError(f"{file}: device: not a device: {value!r}") from None
        out["device"] = device
    if "fp16" in data:
        if not isinstance(data["fp16"], bool):
            raise HParamsError(f"{file}: fp16: expected true or false, got {data['fp16']!r}")
        if data["fp16"]:
            out["dtype"] = "float16"
    return out


def _warn_placement(file: Path, placement: dict[str, str], model: nn.Module) -> None:
    import warnings

    import torch

    param = next(model.parameters(), None)
    if param is None:
        return
    want = placement.get("device")
    if want is not None and torch.device(want) != param.device:
        warnings.warn(f"{file}: device {want} ignored: the model given is on {param.device} and stays there",
                      stacklevel=3)
    if placement.get("dtype") == "float16" and param.dtype != torch.float16:
        warnings.warn(f"{file}: fp16: true ignored: the model given is {str(param.dtype).removeprefix('torch.')} "
                      "and stays so", stacklevel=3)


def _checks(file: Path, method: str, data: dict[str, Any], overrides: dict[str, Any],
            model: nn.Module | str | os.PathLike[str] | None) -> None:
    if data.get("fact_token", "subject_last") != "subject_last":
        raise HParamsError(f"{file}: fact_token: only subject_last is supported, got {data['fact_token']!r}")
    if data.get("layer_selection", "all") != "all":
        raise HParamsError(f"{file}: layer_selection: only all is supported, got {data['layer_selection']!r}")
    rewrite = overrides.get("module_template")
    if "mlp_module_tmp" in data:
        mlp = _template(file, "mlp_module_tmp", data["mlp_module_tmp"])
        if rewrite is not None and not rewrite.format(0).startswith(mlp.format(0) + "."):
            raise HParamsError(f"{file}: rewrite_module_tmp {rewrite!r} is not inside mlp_module_tmp {mlp!r}: "
                               "prune_ext adds δ to the rewritten matrix's output, which must be the MLP's output")
    layer_tmp = _template(file, "layer_module_tmp", data["layer_module_tmp"]) if "layer_module_tmp" in data else None
    layers = overrides.get("layers", [overrides["layer"]] if "layer" in overrides else [])
    loss = _number(file, "v_loss_layer", data["v_loss_layer"], int) if "v_loss_layer" in data else None
    depth = _depth(model)
    bad = [layer for layer in layers if not 0 <= layer < (depth or 10**9)]
    if bad:
        raise HParamsError(f"{file}: layers {bad} do not exist in a model of {depth} layers"
                           + (f" (0–{depth - 1})" if depth else ""))
    if loss is not None and layers and loss < max(layers):
        raise HParamsError(f"{file}: v_loss_layer {loss} is below the edited layer(s) {layers}")
    if depth is not None:
        if loss is not None and loss != depth - 1:
            raise HParamsError(f"{file}: v_loss_layer: {loss}, but the model's last layer is {depth - 1}; prune_ext "
                               f"takes the loss at the model's output: set v_loss_layer: {depth - 1}")
    if isinstance(model, nn.Module):
        names = {name for name, _ in model.named_modules()}
        wanted = [(t, layer) for t in (rewrite, layer_tmp) if t is not None for layer in layers]
        missing = sorted({t.format(layer) for t, layer in wanted if t.format(layer) not in names})
        if missing:
            raise HParamsError(f"{file}: {type(model).__name__} has no module {missing[0]}")
