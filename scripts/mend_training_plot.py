"""The training curve of a MEND editor (``prune-ext train-mend`` folder, or the packaged one) as a PNG.

Left: the training loss per step (each the mean over that step's edits) and its 25-step running mean;
right: the validation scores (single edits on the held-out records) at each validation step.

    .venv/bin/python scripts/mend_training_plot.py prune_ext/editing/mend/weights/smollm2-135m \
        --out docs/mend/training.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from prune_ext.io import atomic_write_with, read_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder with curve.jsonl and val.jsonl")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    folder = Path(args.folder)
    curve, val = read_jsonl(folder / "curve.jsonl"), read_jsonl(folder / "val.jsonl")
    steps = np.array([r["step"] for r in curve])
    loss = np.array([r["loss"] for r in curve])
    window = min(25, len(loss))
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, loss, lw=0.6, alpha=0.4, label="per step")
    left.plot(steps[window - 1:], smooth, lw=2, label=f"{window}-step mean")
    left.set(xlabel="step (10 edits each)", ylabel="training loss", title="MEND training loss")
    left.legend()
    vs = [r["step"] for r in val]
    for key in ("efficacy", "generalization"):
        right.plot(vs, [r[key] for r in val], marker="o", label=key)
    right.set(xlabel="step", ylabel="score", ylim=(0, 1),
              title=f"validation: single edits on {val[-1]['n']} held-out records")
    right.legend()
    fig.tight_layout()
    atomic_write_with(args.out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    print(args.out)


if __name__ == "__main__":
    main()
