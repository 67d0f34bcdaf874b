"""Hyper-parameters of ROME, MEMIT and AlphaEdit, with per-architecture defaults.

Defaults follow the papers' released settings and scale the edited layers to the model's depth:

========== ============================== =====================================
family     ROME layer                     MEMIT layers
========== ============================== =====================================
GPT-2      17 of 48 (XL), 12 of 36,       13–17 of 48 (XL); else the same
           8 of 24; else round(17 n/48)   relative span (≥ 2 layers) ending at
                                          the ROME layer
GPT-J      5 of 28 (scaled for others)    3–8 of 28 (scaled)
Llama-like floor(5 n/32): 5 of 32          L−1 … L+3 around the ROME layer L:
(SmolLM,   (Llama-2-7B), 4 of 30           4–8 of 32, 3–7 of 30 (SmolLM2-135M)
Mistral,   (SmolLM2-135M)
Qwen, ...)
========== ============================== =====================================

MEMIT's λ (``mom2_update_weight``) is the papers' value scaled by the FFN width (see
:func:`default_mom2_update_weight`).

Value optimisation: GPT-2/GPT-J use the papers' weight decay 0.5 (MEMIT norm clamp 0.75, ROME 4);
Llama-family models use the EasyEdit Llama settings (25 steps, weight decay 1e-3, clamp 4).
``mom2_n_samples`` counts key vectors (tokens), not documents.

ENCORE (Gupta et al., 2025) adds two regularisers, off by default: ``mpes`` (most-probable early
stopping of the value optimisation, every value-optimising editor) and ``norm_constraint`` (μ, a
Frobenius-norm penalty on each batch update in MEMIT's and AlphaEdit's least squares).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from typing_extensions import Self

from .models import ArchSpec, arch_spec, get_module, weight_is_transposed

__all__ = [
    "AlphaEditHyperParams",
    "MemitHyperParams",
    "RomeHyperParams",
    "ValueHyperParams",
    "default_memit_layers",
    "default_mom2_update_weight",
    "default_rome_layer",
    "read_hparams_file",
]


@dataclass(kw_only=True)
class ValueHyperParams:
    """What ROME and MEMIT share: the v*/z optimisation, context prefixes and key statistics.

    Attributes:
        v_num_grad_steps: Adam steps on the value delta.
        v_lr: Adam learning rate.
        v_weight_decay: weight of ``‖δ‖ / ‖v_init‖²`` in the loss.
        clamp_norm_factor: ``‖δ‖`` is clamped to this times ``‖v_init‖`` after each step.
        kl_factor: weight of the KL "essence" term on ``"{subject} is a"``.
        loss_stop: a request stops optimising once its loss falls below this.
        mpes: most-probable early stopping (ENCORE): a request also stops as soon as its new
            target is the most probable next token, at every target token (teacher-forced), in
            every context prefix.
        mpes_patience: with ``mpes``, stop at the ``mpes_patience``-th step at which that holds
            (not necessarily consecutive). 1 is the paper's definition; the authors' released
            settings count 2 (Llama-3-8B), 3 (Llama-2-7B) or 4 (GPT-2 XL) such steps.
        context_lengths: ``(tokens, count)`` pairs of generated context prefixes; the bare
            prompt is always included.
        mom2_adjustment: use the key second moment (C) at all.
        mom2_n_samples: key vectors (tokens) in the second-moment estimate.
        stats_seq_len: tokens per sequence while collecting statistics.
        cov_ridge: ``cov_ridge * mean(diag C)`` is added to C's diagonal before solving.
        seed: seed of the context-prefix and corpus sampling.
    """

    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    loss_stop: float = 5e-2
    mpes: bool = False
    mpes_patience: int = 1
    context_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    mom2_adjustment: bool = True
    mom2_n_samples: int = 50_000
    stats_seq_len: int = 256
    cov_ridge: float = 1e-6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mpes_patience < 1:
            raise ValueError(f"mpes_patience must be at least 1, got {self.mpes_patience}")

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(kw_only=True)
class RomeHyperParams(ValueHyperParams):
    """ROME: one rank-one update of ``module_template.format(layer)`` per request.

    ROME's update Λ (C⁻¹k*)ᵀ with Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*) is invariant to the scale of
    C, so the paper's ``mom2_update_weight`` has no effect here and is not a field.
    """

    layer: int
    module_template: str

    @property
    def module_name(self) -> str:
        return self.module_template.format(self.layer)

    @classmethod
    def for_model(cls, model: nn.Module, **overrides: Any) -> RomeHyperParams:
        """Defaults for ``model``'s architecture and depth, with ``overrides`` applied."""
        spec = arch_spec(model)
        fields: dict[str, Any] = {"layer": default_rome_layer(spec), "module_template": spec.mlp_out_template}
        if spec.family not in ("gpt2", "gptj"):
            fields.update(v_num_grad_steps=25, v_weight_decay=1e-3)
        fields.update(overrides)
        return cls(**fields)


@dataclass(kw_only=True)
class MemitHyperParams(ValueHyperParams):
    """MEMIT: per batch, one update of rank ≤ batch size in each of ``layers``.

    ``block_template`` names the transformer block whose output (the residual stream after the
    last edited layer) receives the target z; ``mom2_update_weight`` is λ in (λC + KKᵀ)⁻¹.
    ``norm_constraint`` is ENCORE's μ (0: off): each layer's batch update Δ then minimises
    λ‖ΔK₀‖² + ‖(W + Δ)K − V‖² + μ‖Δ‖²_F, i.e. Δ(λC + KKᵀ + μI) = RKᵀ.
    """

    layers: tuple[int, ...]
    module_template: str
    block_template: str
    mom2_update_weight: float = 15000.0
    norm_constraint: float = 0.0
    clamp_norm_factor: float = 0.75
    context_lengths: tuple[tuple[int, int], ...] = ((10, 5),)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = tuple(sorted(self.layers))
        if not self.layers:
            raise ValueError(f"{type(self).__name__}.layers is empty")
        if self.norm_constraint < 0:
            raise ValueError(f"norm_constraint must be >= 0, got {self.norm_constraint}")

    def module_name(self, layer: int) -> str:
        return self.module_template.format(layer)

    @property
    def z_block_name(self) -> str:
        return self.block_template.format(self.layers[-1])

    @classmethod
    def for_model(cls, model: nn.Module, **overrides: Any) -> Self:
        """Defaults for ``model``'s architecture and depth, with ``overrides`` applied."""
        spec = arch_spec(model)
        fields: dict[str, Any] = {
            "layers": default_memit_layers(spec),
            "module_template": spec.mlp_out_template,
            "block_template": spec.block_template,
        }
        if spec.family not in ("gpt2", "gptj"):
            fields.update(v_num_grad_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4.0)
        fields["mom2_update_weight"] = default_mom2_update_weight(spec, _key_dim(model, spec))
        fields.update(overrides)
        return cls(**fields)


@dataclass(kw_only=True)
class AlphaEditHyperParams(MemitHyperParams):
    """AlphaEdit: MEMIT's values, keys and layer loop, with each update projected onto the null
    space of the preserved keys and sparing the keys of all earlier edits.

    With E[kkᵀ] = U Λ Uᵀ (the key second moment, a mean over ``mom2_n_samples`` tokens), P = Û Ûᵀ
    over the eigenvectors whose eigenvalue is below ``nullspace_threshold`` (or, with
    ``nullspace_energy`` set, the smallest eigenvectors that together carry at most that fraction of
    trace E[kkᵀ]). The batch update is Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + ``l2`` · I)⁻¹, with K_p
    the keys of every earlier edit (kept per layer). λ (``mom2_update_weight``) is unused: the
    projection takes the place of λC (AlphaEdit's code carries the field but does not use it).

    Defaults are AlphaEdit's released settings (``hparams/AlphaEdit/*.json``: threshold 2e-2 and
    L2 = 10 for GPT-2 XL, GPT-J and Llama-3-8B). Their threshold is on the same mean second
    moment (their ``layer_stats`` returns ``mom2.moment()`` = sum / count), so it applies here
    unchanged; it is an absolute eigenvalue, though, and other models' keys have other scales
    (on SmolLM2-135M, 2e-2 puts 28–56 % of the keys' energy inside the "null space"): for such
    models set ``nullspace_energy`` (the AlphaEdit authors' advice for that case, issue #38).
    """

    nullspace_threshold: float = 2e-2
    nullspace_energy: float | None = None
    l2: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mom2_adjustment:
            raise ValueError("AlphaEdit needs the key statistics (mom2_adjustment=True): P comes from them")
        if self.nullspace_threshold <= 0:
            raise ValueError(f"nullspace_threshold must be > 0, got {self.nullspace_threshold}")
        if self.nullspace_energy is not None and not 0 < self.nullspace_energy <= 1:
            raise ValueError(f"nullspace_energy must be in (0, 1], got {self.nullspace_energy}")
        if self.l2 <= 0:
            raise ValueError(f"l2 must be > 0 (the solve needs the ridge), got {self.l2}")


def read_hparams_file(path: str | os.PathLike[str], editor: str | None = None, *, model: Any = None) -> dict[str, Any]:
    """Hyper-parameter overrides from a JSON or YAML file: a mapping of this module's field names, or
    an EasyEdit ROME/MEMIT/AlphaEdit file (it has ``alg_name``), mapped field by field by
    :func:`prune_ext.editing.easyedit.read_easyedit_hparams` (``editor`` and ``model`` check it)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"--hparams {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid JSON/YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of hyper-parameter names to values")
    if "alg_name" in data:
        from .easyedit import read_easyedit_hparams

        return read_easyedit_hparams(path, editor, model=model)[1]
    return data


# λ of the papers' and EasyEdit's settings, and the key dimension (FFN width) they were set for
_LAMBDA_REFERENCE = {"gpt2": (20000.0, 6400), "gptj": (15000.0, 16384)}
_LAMBDA_DEFAULT_REFERENCE = (15000.0, 11008)  # Llama-2-7B (EasyEdit)


def default_mom2_update_weight(spec: ArchSpec, key_dim: int) -> float:
    """λ for MEMIT: the reference λ scaled by ``key_dim / reference key_dim``.

    λC competes with KKᵀ; for a typical key, kᵀ(λC)⁻¹k ≈ d/λ, so keeping d/λ at the value the
    reference settings used (GPT-2 XL 6400/20000, GPT-J 16384/15000, Llama-2-7B 11008/15000)
    keeps the balance between preserved and inserted keys on narrower models (SmolLM2-135M,
    d = 1536: λ ≈ 2090). On the reference models themselves the papers' λ results.
    """
    lam, ref_dim = _LAMBDA_REFERENCE.get(spec.family, _LAMBDA_DEFAULT_REFERENCE)
    return round(lam * key_dim / ref_dim, 1)


def _key_dim(model: nn.Module, spec: ArchSpec) -> int:
    module = get_module(model, spec.mlp_out_template.format(0))
    return int(module.weight.shape[0 if weight_is_transposed(module) else 1])


def default_rome_layer(spec: ArchSpec) -> int:
    """The ROME layer for an architecture and depth (see the module docstring)."""
    n = spec.n_layers
    if spec.family == "gpt2":
        layer = {48: 17, 36: 12, 24: 8}.get(n, round(17 * n / 48))
    elif spec.family == "gptj":
        layer = round(5 * n / 28)
    else:
        layer = (5 * n) // 32
    return min(max(layer, 0), n - 1)


def default_memit_layers(spec: ArchSpec) -> tuple[int, ...]:
    """The MEMIT layers for an architecture and depth (see the module docstring)."""
    n = spec.n_layers
    if spec.family == "gpt2":
        last = default_rome_layer(spec)
        width = max(2, round(5 * n / 48))
        first = last - width + 1
    elif spec.family == "gptj":
        first, last = round(3 * n / 28), round(8 * n / 28)
    else:
        rome = default_rome_layer(spec)
        first, last = rome - 1, rome + 3
    first, last = max(first, 0), min(last, n - 1)
    return tuple(range(first, max(last, first) + 1))
