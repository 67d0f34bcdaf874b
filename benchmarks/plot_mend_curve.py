"""Plot a ``prune-ext train-mend`` run: training loss (smoothed), validation loss and efficacy, η.

    python benchmarks/plot_mend_curve.py RUN_DIR --out docs/mend/curve.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prune_ext.io import read_json, read_jsonl


def smooth(values: list[float], k: int) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="train-mend output folder (curve.jsonl, val.jsonl)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--window", type=int, default=20, help="moving-average window of the training curves")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(args.run)
    curve, val = read_jsonl(run / "curve.jsonl"), read_jsonl(run / "val.jsonl")
    steps = [r["step"] for r in curve]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    for key, label in (("loss", "total"), ("loss_loc", "KL (locality)")):
        ax.plot(steps, smooth([r[key] for r in curve], args.window), label=f"train {label}")
    ax.plot([v["step"] for v in val], [v["loss"] for v in val], "o-", label="validation total")
    ax.set_xlabel("step (10 edits)")
    ax.set_title("loss = 0.1 · edit NLL + KL")
    ax.legend()
    ax = axes[1]
    ax.plot(steps, smooth([r["loss_edit"] for r in curve], args.window), label="train edit NLL (after edit)")
    ax.plot(steps, smooth([r["nll_pre"] for r in curve], args.window), label="train edit NLL (before edit)")
    ax.plot([v["step"] for v in val], [v["loss_edit"] for v in val], "o-", label="validation edit NLL")
    ax.set_xlabel("step")
    ax.legend(loc="upper left", fontsize=7)
    ax2 = ax.twinx()
    ax2.plot([v["step"] for v in val], [v["efficacy"] for v in val], "s--", color="k", label="validation efficacy")
    ax2.set_ylim(0, 1.05)
    ax2.legend(loc="lower right", fontsize=7)
    ax = axes[2]
    etas = list(zip(*[r["eta"] for r in curve]))
    meta = run / "editor" / "mend.json"
    names = read_json(meta)["modules"] if meta.is_file() else [f"η{i}" for i in range(len(etas))]
    for name, eta in zip(names, etas):
        short = ".".join(p for p in name.split(".") if p.isdigit() or p.endswith("proj") or p.startswith("c_"))
        ax.plot(steps, eta, lw=0.8, label=short)
    ax.set_xlabel("step")
    ax.set_title("learned step sizes η")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
