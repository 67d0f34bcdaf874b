"""How much of SmolLM2's key energy AlphaEdit's "null space" holds (README "Lifelong editing").

For each matrix AlphaEdit edits, from the same key statistics as the lifelong runs (NQ passages,
50 000 tokens): the dimension of the null space that AlphaEdit's released threshold (eigenvalues of
E[kkᵀ] below 2e-2) selects and the share of the keys' energy (trace) it carries, and how many
dimensions carry at most 1 % and 0.1 % of the energy. Writes docs/lifelong/null_space.md.

    .venv/bin/python scripts/null_space.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from prune_ext.editing import AlphaEdit, AlphaEditHyperParams, load_model
from prune_ext.editing.requests import data_dir
from prune_ext.io import atomic_write_text

OUT = Path(__file__).resolve().parent.parent / "docs" / "lifelong" / "null_space.md"


def main() -> None:
    model, tok = load_model("smollm2-135m")
    editor = AlphaEdit(model, tok, corpus=data_dir() / "tasks" / "nq-open.jsonl", progress=False)
    threshold = AlphaEditHyperParams.nullspace_threshold
    lines = ["| matrix | n | dims below 2e-2 | their energy share | dims with ≤ 1 % of the energy | ≤ 0.1 % |",
             "|---|---|---|---|---|---|"]
    for name in editor.edited_modules():
        evals = editor.null_space(name).eigenvalues.clamp_min(0).to(torch.float64)
        share = evals.cumsum(0) / evals.sum()
        below = int((evals < threshold).sum())
        lines.append(f"| {name} | {len(evals)} | {below} | {float(share[below - 1]) if below else 0.0:.3f} | "
                     f"{int((share <= 1e-2).sum())} | {int((share <= 1e-3).sum())} |")
    atomic_write_text(OUT, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
