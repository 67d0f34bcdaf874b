"""Optional features and the pip extra that installs each, so that a missing one is one clear line.

Core ``prune_ext`` (the restraint, the editors, sessions, ``prune-ext run`` on a local folder) needs
torch, transformers, numpy, safetensors, tqdm and pyyaml only; everything else is an extra.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "MissingExtraError", "require"]

# importable module -> (pip package, extra of prune_ext that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "gguf": ("gguf", "demo"),
    "accelerate": ("accelerate", "demo"),
    "rouge_score": ("rouge-score", "eval"),
    "matplotlib": ("matplotlib", "report"),
    "peft": ("peft", "export"),
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency that a feature needs is not installed (the message says how to get it)."""


def require(module: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` naming the extra to install if ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is not None:
        return
    package, extra = EXTRAS[module]
    raise MissingExtraError(f"{feature} needs the '{package}' package: pip install 'prune_ext[{extra}]' "
                            f"(or pip install {package})")
