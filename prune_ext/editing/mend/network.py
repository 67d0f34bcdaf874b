"""MEND's editor networks (Mitchell et al., ICLR 2022, "Fast Model Editing at Scale").

For an edited linear layer with input u_t and output-gradient δ_t at token t, the fine-tuning
gradient is ∇W = Σ_t δ_t u_tᵀ. MEND maps each pair through a small network g, (ũ_t, δ̃_t) =
g([u_t; δ_t]), and edits with ΔW = −η Σ_t δ̃_t ũ_tᵀ (η learned per edited matrix), a product of
two thin factors. What is built here follows the authors' configuration (``config/alg/mend.yaml``:
``combine: True, n_hidden: 1, init: id, norm: True, act: relu, mlp_class: IDMLP, shared: True``):

* **input normalisation** — [u; δ] is standardised per component with running mean / variance
  collected over every training token (Welford's update; frozen outside training). Until two
  tokens have been seen it is the identity, so an untrained network is exactly the identity map;
* **low-rank residual MLP with identity initialisation** — ``n_hidden + 1`` layers, each
  z ← z + relu(scale_m ⊙ (A (B z) + b) + shift_m) with A (d × r) zero-initialised and B (r × d)
  standard normal (so every layer starts as the identity), r = min(rank, d), d = dim u + dim δ;
* **per-layer scale and shift** — (scale_m, shift_m) are rows of a table indexed by the edited
  matrix's position among the matrices of its shape ("modes"), initialised to (1, 0);
* **one network per shape** — matrices with the same (in, out) shape share a network (MEND
  keys its networks by ``(in_features, out_features)``): for Llama, gate_proj and up_proj of the
  edited layers share one and down_proj another.

:class:`MendNetworks` holds the networks and η for a list of edited modules and saves/loads them
as ``mend.safetensors`` + ``mend.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_ext.io import atomic_write, write_json

__all__ = [
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "GradientEditor",
    "IdentityLowRankLayer",
    "MendNetConfig",
    "MendNetworks",
    "RunningNorm",
    "shape_key",
]

WEIGHTS_FILE = "mend.safetensors"
CONFIG_FILE = "mend.json"
_EPS = 1e-7  # added to the standard deviation, as in MEND


@dataclass(kw_only=True)
class MendNetConfig:
    """The editor networks' architecture (MEND's ``config/alg/mend.yaml`` names in brackets).

    Attributes:
        rank: inner width r of each low-rank layer, capped at its input width [``rank``: 1920].
        n_hidden: hidden layers; the network has ``n_hidden + 1`` residual layers [``n_hidden``: 1].
        norm: standardise the inputs with running statistics [``norm``: True].
        edit_lr: initial step size η of every edited matrix [``edit_lr``: 1e-4].
        seed: seed of the B matrices' initialisation.
    """

    rank: int = 1920
    n_hidden: int = 1
    norm: bool = True
    edit_lr: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.n_hidden < 0:
            raise ValueError(f"MendNetConfig: rank must be ≥ 1 and n_hidden ≥ 0, got {self.rank}, {self.n_hidden}")


def shape_key(in_features: int, out_features: int) -> str:
    """The key of the network shared by matrices of this shape, e.g. ``"576x1536"`` (in × out)."""
    return f"{in_features}x{out_features}"


class RunningNorm(nn.Module):
    """Per-component standardisation with running statistics (Welford / Chan, float64 buffers).

    ``update(x)`` adds rows of ``x`` to the statistics; ``forward(x)`` returns
    ``(x − mean) / (std + 1e-7)`` with the unbiased std, or ``x`` unchanged while fewer than two
    rows have been seen.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x`` (n, dim) into the running mean and sum of squared deviations."""
        if x.shape[0] == 0:
            return
        x = x.detach().to(torch.float64)
        n = float(x.shape[0])
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        total = self.count + n
        diff = batch_mean - self.mean
        self.mean += diff * (n / total)
        self.m2 += batch_m2 + diff**2 * (self.count * n / total)
        self.count += n

    @property
    def std(self) -> torch.Tensor:
        """The unbiased standard deviation per component (ones until two rows were seen)."""
        if self.count < 2:
            return torch.ones_like(self.mean)
        return (self.m2 / (self.count - 1)).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return x
        mean = self.mean.to(x.dtype)
        std = self.std.to(x.dtype)
        return (x - mean) / (std + _EPS)


class IdentityLowRankLayer(nn.Module):
    """z ↦ z + relu(scale_m ⊙ (A (B z) + b) + shift_m): MEND's ``LRLinear`` with ``init="id"``.

    A = ``up`` (dim × r) starts at zero and B = ``down`` (r × dim) standard normal, so the layer
    starts as the identity; ``mode_scale`` / ``mode_shift`` hold one row per mode (edited matrix).
    """

    def __init__(self, dim: int, rank: int, n_modes: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        mid = min(rank, dim)
        self.down = nn.Parameter(torch.randn(mid, dim, generator=generator))
        self.up = nn.Parameter(torch.zeros(dim, mid))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, z: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
        """``z`` (n, dim), ``modes`` (n,) long: each row's mode."""
        pre = (z @ self.down.T) @ self.up.T + self.bias
        pre = pre * self.mode_scale[modes] + self.mode_shift[modes]
        # MEND clamps instead of calling relu "so the gradient at 0 isn't 0": with A = 0 every entry
        # of `pre` starts at exactly 0, and only a gradient of 1 there makes A trainable at all.
        # clamp's gradient at 0 is 1 in torch 2.13 and 0 in 2.14, so say it explicitly: where()
        # passes the gradient to every entry it selects, 0 included.
        return torch.where(pre >= 0, pre, 0.0) + z


class GradientEditor(nn.Module):
    """MEND's gradient transform for one matrix shape (``GradientTransform`` with ``combine``).

    ``forward(u, delta, modes)`` maps the rows of ``u`` (n, in) and ``delta`` (n, out) to
    (ũ, δ̃) of the same shapes; in training mode the rows first update the running statistics.
    """

    def __init__(self, in_features: int, out_features: int, config: MendNetConfig, n_modes: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dim = in_features + out_features
        self.use_norm = config.norm
        self.norm = RunningNorm(dim)
        self.layers = nn.ModuleList(
            IdentityLowRankLayer(dim, config.rank, n_modes, generator) for _ in range(config.n_hidden + 1)
        )

    def forward(self, u: torch.Tensor, delta: torch.Tensor, modes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([u, delta], dim=-1).to(self.layers[0].down.dtype)
        if self.training:
            self.norm.update(z)
        if self.use_norm:
            z = self.norm(z)
        for layer in self.layers:
            z = layer(z, modes)
        return z[:, : self.in_features], z[:, self.in_features :]


class MendNetworks(nn.Module):
    """The editor networks of one model: a :class:`GradientEditor` per matrix shape and the learned
    step size η per edited matrix (``edit_lrs``).

    Args:
        modules: names of the edited modules, in order.
        shapes: ``(in_features, out_features)`` of each.
        config: the architecture.
    """

    def __init__(self, modules: Sequence[str], shapes: Sequence[tuple[int, int]], config: MendNetConfig) -> None:
        super().__init__()
        if len(modules) != len(shapes) or not modules:
            raise ValueError(f"MendNetworks needs one shape per module, got {len(modules)} and {len(shapes)}")
        self.config = config
        self.module_names = list(modules)
        self.shapes = [(int(i), int(o)) for i, o in shapes]
        groups: dict[str, list[str]] = {}
        for name, (i, o) in zip(self.module_names, self.shapes):
            groups.setdefault(shape_key(i, o), []).append(name)
        self.key_of = {name: shape_key(*shape) for name, shape in zip(self.module_names, self.shapes)}
        self.mode_of = {name: groups[self.key_of[name]].index(name) for name in self.module_names}
        generator = torch.Generator().manual_seed(config.seed)
        nets = {}
        for key, names in groups.items():
            i, o = self.shapes[self.module_names.index(names[0])]
            nets[key] = GradientEditor(i, o, config, len(names), generator)
        self.nets = nn.ModuleDict(nets)
        self.edit_lrs = nn.Parameter(torch.full((len(self.module_names),), float(config.edit_lr)))

    def network_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the step sizes (MEND's editor-network optimiser)."""
        return list(self.nets.parameters())

    def n_parameters(self) -> int:
        """Trainable parameters, step sizes included."""
        return sum(p.numel() for p in self.parameters())

    def transform(
        self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(ũ, δ̃) for each module's (u (n, in), δ (n, out)); modules sharing a network go through
        it in one batch (each row with its module's mode)."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        by_key: dict[str, list[str]] = {}
        for name in factors:
            by_key.setdefault(self.key_of[name], []).append(name)
        for key, names in by_key.items():
            us = [factors[n][0] for n in names]
            ds = [factors[n][1] for n in names]
            device = us[0].device
            modes = torch.cat(
                [torch.full((u.shape[0],), self.mode_of[n], dtype=torch.long, device=device) for n, u in zip(names, us)]
            )
            u_t, d_t = self.nets[key](torch.cat(us), torch.cat(ds), modes)
            start = 0
            for name, u in zip(names, us):
                stop = start + u.shape[0]
                out[name] = (u_t[start:stop], d_t[start:stop])
                start = stop
        return out

    def update_factors(
        self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """ΔW = out_factor @ in_factorᵀ (math layout, out × in) per module, with
        ``out_factor = −η δ̃ᵀ`` (out × n) and ``in_factor = ũᵀ`` (in × n)."""
        transformed = self.transform(factors)
        result = {}
        for name, (u_t, d_t) in transformed.items():
            eta = self.edit_lrs[self.module_names.index(name)]
            result[name] = (-eta * d_t.T, u_t.T)
        return result

    # -- files ------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What :meth:`save` writes to ``mend.json`` (besides ``extra``)."""
        return {
            "format": "prune_ext.mend/1",
            "modules": self.module_names,
            "shapes": [list(s) for s in self.shapes],
            "networks": {k: {"modes": [n for n in self.module_names if self.key_of[n] == k]} for k in self.nets},
            "config": asdict(self.config),
            "parameters": self.n_parameters(),
        }

    def save(self, folder: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
             extra: dict[str, Any] | None = None) -> Path:
        """Write ``mend.safetensors`` (network weights in ``dtype``; statistics and step sizes in
        their own precision) and ``mend.json`` to ``folder``, each atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = {}
        for name, value in self.state_dict().items():
            value = value.detach().cpu()
            if name != "edit_lrs" and ".norm." not in f".{name}" and value.is_floating_point():
                value = value.to(dtype)
            tensors[name] = value.contiguous()
        with atomic_write(folder / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        meta = self.describe()
        meta["dtype"] = str(dtype).removeprefix("torch.")
        meta.update(extra or {})
        write_json(folder / CONFIG_FILE, meta)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> tuple[MendNetworks, dict[str, Any]]:
        """Networks saved by :meth:`save` (weights back in float32) and the ``mend.json`` contents."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != "prune_ext.mend/1":
            raise ValueError(f"{folder / CONFIG_FILE}: not a prune_ext MEND editor (format {meta.get('format')!r})")
        nets = cls(meta["modules"], [tuple(s) for s in meta["shapes"]], MendNetConfig(**meta["config"]))
        state = load_file(str(folder / WEIGHTS_FILE))
        own = nets.state_dict()
        state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
        nets.load_state_dict(state, strict=True)
        return nets, meta
