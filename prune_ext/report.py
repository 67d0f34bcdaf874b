"""Plots and a summary table from one or more experiment folders (like the paper's Figures 2–4, 15).

Restrained runs are drawn solid, unrestrained ones dashed; runs are overlaid in every panel.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

EDIT_METRICS = ("efficacy", "generalization", "locality")
SPECTRAL = (("condition_number", "condition number κ"), ("sigma_max", "σmax"), ("sigma_min", "σmin"))
NOT_TASKS = {"edits", "final", "matrices", "seconds", "restraints", *EDIT_METRICS}


def load_run(folder: str | Path) -> dict[str, Any]:
    """config.json and trace.jsonl of one run folder."""
    folder = Path(folder)
    for name in ("config.json", "trace.jsonl"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a prune-ext run folder (no {name})")
    config = json.loads((folder / "config.json").read_text())
    rows = [json.loads(line) for line in (folder / "trace.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{folder}/trace.jsonl holds no checkpoint yet")
    # a resumed run may repeat a checkpoint: keep the last of each
    by_edits = {r["edits"]: r for r in rows}
    return {"folder": str(folder), "config": config, "rows": [by_edits[k] for k in sorted(by_edits)]}


def label(run: dict[str, Any]) -> str:
    c = run["config"]
    restrained = _restrained(run)
    if not restrained:
        what = "no PRUNE"
    else:
        param = f"α={c['alpha']:g}" if c["restrain"] == "log" else f"β={c['beta']:g}"
        when = f"every {c['every']}" if c.get("every") else "once"
        what = f"PRUNE {c['restrain']} {param}, {when}"
    return f"{c['editor'].upper()} · {what}"


def _restrained(run: dict[str, Any]) -> bool:
    c = run["config"]
    return c["restrain"] != "none" and Path(run["folder"]).resolve() != Path(c.get("unrestrained_out") or
                                                                                "/nonexistent").resolve()


def _series(run: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in run["rows"]:
        if key in row and isinstance(row[key], (int, float)) and not math.isnan(row[key]):
            xs.append(row["edits"])
            ys.append(row[key])
    return xs, ys


def _spectral_series(run: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    """Per checkpoint, the largest (κ, σmax) or smallest (σmin) value over the edited matrices."""
    pick = min if key == "sigma_min" else max
    xs, ys = [], []
    for row in run["rows"]:
        values = [m[key] for m in row.get("matrices", {}).values()]
        if values:
            xs.append(row["edits"])
            ys.append(pick(values))
    return xs, ys


def _tasks(runs: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for row in run["rows"]:
            names += [k for k, v in row.items() if k not in NOT_TASKS and isinstance(v, (int, float))
                      and k not in names]
    return names


def write_report(folders: list[str | Path], out: str | Path) -> list[Path]:
    """Draw the figures and the markdown table into ``out``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(f) for f in folders]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = [dict(color=colors[i % len(colors)], linestyle="-" if _restrained(r) else "--", marker="o",
                  markersize=3, label=label(r)) for i, r in enumerate(runs)]
    written = []

    def figure(name: str, panels: list[tuple[str, Any]], ylog: set[str] = frozenset()) -> None:
        if not panels:
            return
        cols = min(3, len(panels))  # rows of at most three panels: five tasks stay readable
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows + 0.4), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (title, series) in zip(axes.flat, panels):
            for run, st in zip(runs, style):
                xs, ys = series(run)
                if xs:
                    ax.plot(xs, ys, **st)
            ax.set_title(title)
            ax.set_xlabel("number of edits")
            if title in ylog:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(runs)), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, (0.08 + 0.04 * ((len(runs) - 1) // 3)) / rows, 1, 1))
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    figure("spectrum.png", [(title, lambda r, k=key: _spectral_series(r, k)) for key, title in SPECTRAL],
           ylog={"condition number κ"})
    figure("editing.png", [(m, lambda r, k=m: _series(r, k)) for m in EDIT_METRICS])
    figure("tasks.png", [(t, lambda r, k=t: _series(r, k)) for t in _tasks(runs)], ylog={"perplexity"})
    table = out / "summary.md"
    table.write_text(summary_table(runs))
    written.append(table)
    return written


def summary_table(runs: list[dict[str, Any]]) -> str:
    """Markdown table of each run's final checkpoint."""
    tasks = _tasks(runs)
    head = ["run", "edits", *EDIT_METRICS, *tasks, "κ max", "σmax", "σmin", "edit s", "PRUNE s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        row = run["rows"][-1]
        mats = row.get("matrices", {}).values()
        cells = [label(run), str(row["edits"])]
        cells += [_fmt(row.get(k)) for k in (*EDIT_METRICS, *tasks)]
        cells += [_fmt(max((m["condition_number"] for m in mats), default=None)),
                  _fmt(max((m["sigma_max"] for m in mats), default=None)),
                  _fmt(min((m["sigma_min"] for m in mats), default=None)),
                  _fmt(row.get("seconds", {}).get("edit"), 0), _fmt(row.get("seconds", {}).get("restrain"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
