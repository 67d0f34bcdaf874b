"""The MEND editor: a trained gradient transform turns one fine-tuning gradient into the edit.

For each request, :meth:`Mend.compute` takes the gradient of the edit loss (the mean NLL of
``target_new`` after ``prompt``) at each edited matrix on the model as it is now, as its rank-one
pieces (u_t, δ_t), passes them through the trained networks (:mod:`.network`, inference mode: the
normalisation statistics are frozen) and returns ΔW = −η Σ_t δ̃_t ũ_tᵀ per matrix as a
:class:`~prune_ext.updates.LowRankUpdate` of rank ≤ the number of tokens of the edit row. The model
is not written; sequential editing calls it on the model with the earlier edits applied.

The networks come from ``prune-ext train-mend`` (:mod:`.train`); ``MendHyperParams.editor_path``
points to its output folder. A trained editor for SmolLM2-135M ships with the package
(``weights/smollm2-135m``) and is the default for that model.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import Self

from prune_ext.updates import LowRankUpdate

from ..base import Editor
from ..models import arch_spec, editing_mode, get_module, make_update, model_id, weight_is_transposed
from ..requests import as_requests
from ..tokens import pad_id
from .grads import RowBatch, edited_shape, gradient_factors, make_row
from .network import CONFIG_FILE, MendNetworks

__all__ = ["PACKAGED_WEIGHTS", "Mend", "MendHyperParams", "default_mend_layers", "mend_module_templates",
           "resolve_editor_path"]

PACKAGED_WEIGHTS = Path(__file__).resolve().parent / "weights"

# the MLP matrices MEND edits in each family (the authors' inner_params: c_fc and c_proj for GPT-2,
# EasyEdit's gate_proj, up_proj and down_proj for Llama), as module-name templates
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "llama": ("model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj", "model.layers.{}.mlp.down_proj"),
    "gpt2": ("transformer.h.{}.mlp.c_fc", "transformer.h.{}.mlp.c_proj"),
    "gptj": ("transformer.h.{}.mlp.fc_in", "transformer.h.{}.mlp.fc_out"),
    "gpt_neox": ("gpt_neox.layers.{}.mlp.dense_h_to_4h", "gpt_neox.layers.{}.mlp.dense_4h_to_h"),
}


def mend_module_templates(model: nn.Module) -> tuple[str, ...]:
    """The edited MLP matrices of one block of ``model``, as templates with ``{}`` for the layer."""
    return _TEMPLATES[arch_spec(model).family]


def default_mend_layers(model: nn.Module, n: int = 3) -> tuple[int, ...]:
    """The last ``n`` blocks (MEND edits the MLPs of the last three)."""
    total = arch_spec(model).n_layers
    return tuple(range(max(0, total - n), total))


def train_command(model: nn.Module | str) -> str:
    """The command that trains an editor for ``model`` (for error messages)."""
    ident = model if isinstance(model, str) else model_id(model)
    return (f"prune-ext train-mend --model {ident} --data ../shared/data/counterfact/counterfact-edit.json "
            "--out DIR")


def resolve_editor_path(path: str | Path) -> Path:
    """The folder holding ``mend.json``: ``path`` itself, or ``path/editor`` (a train-mend folder)."""
    folder = Path(path)
    for candidate in (folder, folder / "editor"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no trained MEND editor at {folder} (no {CONFIG_FILE} there or in {folder / 'editor'})")


@dataclass(kw_only=True)
class MendHyperParams:
    """MEND at inference: which trained editor, and which matrices it edits.

    Attributes:
        editor_path: a ``prune-ext train-mend --out`` folder (or its ``editor/`` subfolder).
            Default: the editor shipped for the model (SmolLM2-135M), else none.
        layers: the edited blocks (default: the last three).
        module_templates: the edited matrices of a block (default per family; Llama: gate_proj,
            up_proj, down_proj; GPT-2: c_fc, c_proj).
    """

    layers: tuple[int, ...]
    module_templates: tuple[str, ...]
    editor_path: str | None = None

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        self.module_templates = tuple(self.module_templates)
        if not self.layers or not self.module_templates:
            raise ValueError("MendHyperParams: layers and module_templates must not be empty")
        if self.editor_path is not None:
            self.editor_path = str(self.editor_path)

    @property
    def module_names(self) -> list[str]:
        """Edited modules, block by block, in template order."""
        return [t.format(layer) for layer in self.layers for t in self.module_templates]

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_model(cls, model: nn.Module, **overrides: Any) -> MendHyperParams:
        """Defaults for ``model`` (its packaged editor if one ships), with ``overrides`` applied."""
        fields: dict[str, Any] = {
            "layers": default_mend_layers(model), "module_templates": mend_module_templates(model),
        }
        packaged = PACKAGED_WEIGHTS / model_id(model)
        if (packaged / CONFIG_FILE).is_file():
            fields["editor_path"] = str(packaged)
        fields.update(overrides)
        return cls(**fields)


class Mend(Editor):
    """A trained MEND editor bound to a model: :meth:`compute` returns one update per edited matrix.

    Raises ``FileNotFoundError`` (naming the ``train-mend`` command) when no trained editor is found,
    and ``ValueError`` when the editor was trained for other matrices or shapes.
    """

    name = "mend"
    hparams_class = MendHyperParams
    batched = False

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        hparams: MendHyperParams | None = None,
        *,
        corpus: Any = None,
        cache_dir: Any = None,
        progress: bool = True,
    ) -> None:
        super().__init__(model, tokenizer, hparams, corpus=corpus, cache_dir=cache_dir, progress=progress)
        hp: MendHyperParams = self.hparams
        if hp.editor_path is None:
            raise FileNotFoundError(
                f"no trained MEND editor for {model_id(model)} ships with prune_ext: run `{train_command(model)}` "
                "and pass hparams={'editor_path': 'DIR'}"
            )
        try:
            folder = resolve_editor_path(hp.editor_path)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc}: run `{train_command(model)}` first") from None
        nets, meta = MendNetworks.load(folder)
        if nets.module_names != hp.module_names:
            raise ValueError(
                f"the MEND editor at {folder} edits {nets.module_names}, not {hp.module_names}; "
                "train one for these modules or change layers/module_templates"
            )
        for name, shape in zip(nets.module_names, nets.shapes):
            if edited_shape(model, name) != tuple(shape):
                raise ValueError(f"the MEND editor at {folder} was trained for {name} of shape (in, out) = "
                                 f"{tuple(shape)}, the model's is {edited_shape(model, name)}")
        trained_for = meta.get("model")
        if trained_for and trained_for != model_id(model):
            warnings.warn(f"the MEND editor at {folder} was trained on {trained_for!r}, this model is "
                          f"{model_id(model)!r}", stacklevel=2)
        param = next(model.parameters())
        wide = torch.promote_types(param.dtype, torch.float32)  # float32; float64 for a float64 model
        self.networks = nets.to(device=param.device, dtype=wide).eval()
        for p in self.networks.parameters():
            p.requires_grad_(False)
        self.editor_folder = folder
        self.editor_meta = meta
        self.last_loss: float | None = None

    def edited_modules(self) -> list[str]:
        return self.hparams.module_names

    def compute(self, requests: Any) -> list[LowRankUpdate]:
        """One update per edited matrix for one step (a request, or several edited together: the
        gradient of their mean loss, as in MEND's batched edits). The model is left as it was."""
        reqs = as_requests(requests)
        if not reqs:
            raise ValueError("MEND: no request to edit")
        rows = [make_row(self.tokenizer, r.prompt, r.target_new) for r in reqs]
        names = self.edited_modules()
        batch = RowBatch(rows, pad_id(self.tokenizer), next(self.model.parameters()).device)
        with editing_mode(self.model):
            grads = gradient_factors(self.model, names, batch)
        self.last_loss = float(grads.loss)
        with torch.no_grad():
            pairs = self.networks.update_factors(grads.factors)
        return [self._update(name, *pairs[name]) for name in names]

    def _update(self, name: str, out_factor: torch.Tensor, in_factor: torch.Tensor) -> LowRankUpdate:
        """The update in ``name``'s stored layout: float32, or float64 for a float64 model."""
        if out_factor.dtype != torch.float64:
            return make_update(self.model, name, out_factor, in_factor)
        if weight_is_transposed(get_module(self.model, name)):
            return LowRankUpdate(name, in_factor.detach(), out_factor.detach())
        return LowRankUpdate(name, out_factor.detach(), in_factor.detach())
