"""Plots, a summary table and its numbers from one or more experiment folders (the paper's Figures 2–4, 15).

Restrained runs are drawn solid, unrestrained ones dashed; runs are overlaid in every panel, and a
score's 95 % interval (the trace rows' ``"intervals"``) is a shaded band around its line.
``summary.md`` shows each final score as ``0.880 [0.83, 0.92]`` with its sample size (``n``) in
the header when all runs agree, else in the cell; with two or more runs it adds one "reading"
line per metric and pair of runs (with four or more runs: each run against the unrestrained and
the plain-PRUNE runs). Where both rows hold per-item outcomes of the same items (``per_edit`` with
the same ids at the last checkpoint both reached, ``per_item`` of tasks sampled alike), the reading
is a paired test (:func:`prune_ext.evaluation.intervals.paired_difference` /
:func:`~prune_ext.evaluation.intervals.paired_perplexity`): the difference, its 95 % interval, the
p-value, and "real" (p < 0.05, not corrected for the number of comparisons) or "within noise". Older
traces fall back to whether the two 95 % intervals overlap, and say so. Runs are labelled by their
restraint, spectral variants included (``config.json``'s ``variant``, or its threshold_scale /
protect_energy / protect_damp). ``summary.json`` holds the same numbers for generating tables
elsewhere. Traces written before intervals existed still render (scores without brackets); a torn
last line of ``trace.jsonl`` is dropped with one warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .io import atomic_write_text, read_json, read_jsonl, write_json

__all__ = ["EDIT_METRICS", "LIVE_METRICS", "label", "load_run", "reading_lines", "summary_data", "summary_table",
           "write_report"]

EDIT_METRICS = ("efficacy", "generalization", "locality")
LIVE_METRICS = ("live_efficacy", "live_generalization")
SPECTRAL = (("condition_number", "condition number κ"), ("sigma_max", "σmax"), ("sigma_min", "σmin"),
            ("delta_fro", "‖ΔW‖_F"))
NOT_TASKS = {"edits", "final", "matrices", "seconds", "n", "intervals", "restraints", "restrained", "edits_scored",
             "scores_from", "variant", "per_edit", "per_item",
             "perplexity_source",
             *EDIT_METRICS, *LIVE_METRICS}

Run = dict[str, Any]
Series = tuple[list[int], list[float], list[float], list[float]]


def load_run(folder: str | Path) -> Run:
    """config.json and trace.jsonl of one run folder (a torn last trace line is dropped, with a warning)."""
    folder = Path(folder)
    for name in ("config.json", "trace.jsonl"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a prune-ext run folder (no {name})")
    config = read_json(folder / "config.json")
    rows = read_jsonl(folder / "trace.jsonl")
    if not rows:
        raise ValueError(f"{folder}/trace.jsonl holds no checkpoint yet")
    # a resumed run may repeat a checkpoint: keep the last of each
    by_edits = {r["edits"]: r for r in rows}
    return {"folder": str(folder), "config": config, "rows": [by_edits[k] for k in sorted(by_edits)]}


def label(run: Run) -> str:
    """``EDITOR · PRUNE log α=1.2, once`` / ``EDITOR+MPES · no PRUNE``, from the run's config (the
    editor's ENCORE options, MPES and the norm constraint μ, are part of its name)."""
    c = run["config"]
    hparams = c.get("hparams") or {}
    editor = c["editor"].upper() + ("+MPES" if hparams.get("mpes") else "")
    if hparams.get("norm_constraint"):
        editor += f"+norm μ={hparams['norm_constraint']:g}"
    when = f"every {c['every']}" if c.get("every") else "once"
    if isinstance(c.get("variant"), dict):  # a --variant-out folder: restrained once by its variant
        what = f"{c['variant'].get('label') or c['variant'].get('spec')}, once"
    elif not _restrained(run):
        what = "no PRUNE"
    elif c.get("threshold_scale", 1.0) != 1.0 or c.get("protect_energy") is not None:
        from .spectral import Restraint

        what = Restraint(c["restrain"], c["alpha"], c["beta"], c.get("threshold_scale", 1.0),
                         c.get("protect_energy"), c.get("protect_damp", 1.0)).label() + f", {when}"
    else:
        param = f"α={c['alpha']:g}" if c["restrain"] == "log" else f"β={c['beta']:g}"
        what = f"PRUNE {c['restrain']} {param}, {when}"
    return f"{editor} · {what}"


def _labels(runs: list[Run]) -> list[str]:
    """Each run's label, with its folder name added where two runs would share one."""
    plain = [label(r) for r in runs]
    return [f"{lab} ({Path(r['folder']).name})" if plain.count(lab) > 1 else lab for lab, r in zip(plain, runs)]


def _restrained(run: Run) -> bool:
    """Is this folder the restrained variant? The trace says so (``restrained`` in its rows); older
    traces: not the config's ``unrestrained_out`` (the same folder, or a copy of it by that name)."""
    rows = run.get("rows") or []
    if rows and "restrained" in rows[-1]:
        return bool(rows[-1]["restrained"])
    c = run["config"]
    other = c.get("unrestrained_out")
    folder = Path(run["folder"])
    return c["restrain"] != "none" and not (other and (folder.resolve() == Path(other).resolve()
                                                       or folder.name == Path(other).name))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _score(row: dict[str, Any], key: str) -> tuple[float | None, list[float] | None, int | None]:
    """A row's ``(mean, [lo, hi], n)`` for one metric; ``None`` for what the row does not hold."""
    mean = row.get(key)
    if not _number(mean):
        return None, None, None
    interval = (row.get("intervals") or {}).get(key)
    if not (isinstance(interval, (list, tuple)) and len(interval) == 2 and all(_number(v) for v in interval)):
        interval = None
    n = (row.get("n") or {}).get(key)
    return float(mean), (None if interval is None else [float(v) for v in interval]), n if _number(n) else None


def _series(run: Run, key: str) -> Series:
    xs, ys, los, his = [], [], [], []
    for row in run["rows"]:
        mean, interval, _ = _score(row, key)
        if mean is not None:
            xs.append(row["edits"])
            ys.append(mean)
            los.append(interval[0] if interval else math.nan)
            his.append(interval[1] if interval else math.nan)
    return xs, ys, los, his


def _spectral(row: dict[str, Any], key: str) -> float | None:
    """The largest (κ, σmax, ‖ΔW‖_F) or smallest (σmin) value over a row's edited matrices."""
    values = [m[key] for m in (row.get("matrices") or {}).values() if _number(m.get(key))]
    if not values:
        return None
    return min(values) if key == "sigma_min" else max(values)


def _spectral_series(run: Run, key: str) -> Series:
    xs, ys = [], []
    for row in run["rows"]:
        value = _spectral(row, key)
        if value is not None:
            xs.append(row["edits"])
            ys.append(value)
    return xs, ys, [math.nan] * len(xs), [math.nan] * len(xs)


def _present(runs: list[Run], keys: tuple[str, ...], get: Callable[[dict[str, Any], str], Any]) -> list[str]:
    return [k for k in keys if any(get(row, k) is not None for run in runs for row in run["rows"])]


def _tasks(runs: list[Run]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for row in run["rows"]:
            names += [k for k, v in row.items() if k not in NOT_TASKS and _number(v) and k not in names]
    return names


def _metrics(runs: list[Run]) -> list[str]:
    """Every score shown: the editing metrics, the live ones when present, then each task."""
    return [*EDIT_METRICS, *_present(runs, LIVE_METRICS, lambda r, k: _score(r, k)[0]), *_tasks(runs)]


def write_report(folders: list[str | Path], out: str | Path) -> list[Path]:
    """Draw the figures and write ``summary.md`` and ``summary.json`` into ``out``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(f) for f in folders]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = _labels(runs)
    style = [dict(color=colors[i % len(colors)], linestyle="-" if _restrained(r) else "--", marker="o",
                  markersize=3, label=lab) for i, (r, lab) in enumerate(zip(runs, labels))]
    written = []

    def figure(name: str, panels: list[tuple[str, Callable[[Run], Series]]],
               ylog: frozenset[str] = frozenset()) -> None:
        if not panels:
            return
        cols = 2 if len(panels) == 4 else min(3, len(panels))  # rows of at most three (four: 2 × 2)
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows + 0.4), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (title, series) in zip(axes.flat, panels):
            data = [(series(run), st) for run, st in zip(runs, style)]
            positive = [v for (_, ys, _, _), _ in data for v in ys if _number(v) and v > 0]
            # a run that blows up (σmax 10¹² beside 10²) would flatten every other line on a linear axis
            log = title in ylog or bool(positive and max(positive) > 1e3 * min(positive))
            for (xs, ys, los, his), st in data:
                if xs:
                    if log:  # a 0 (‖ΔW‖_F before the first edit) has no place on a log axis
                        ys = [v if _number(v) and v > 0 else math.nan for v in ys]
                    ax.plot(xs, ys, **st)
                    if any(not math.isnan(v) for v in los):
                        ax.fill_between(xs, los, his, color=st["color"], alpha=0.15, linewidth=0)
            ax.set_title(title)
            ax.set_xlabel("number of edits")
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        handles, legend = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, legend, loc="lower center", ncol=min(3, len(runs)), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, (0.08 + 0.04 * ((len(runs) - 1) // 3)) / rows, 1, 1))
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    spectral = dict(SPECTRAL)
    figure("spectrum.png", [(spectral[k], lambda r, k=k: _spectral_series(r, k))
                            for k in _present(runs, tuple(spectral), _spectral)],
           ylog=frozenset({"condition number κ"}))
    edit_metrics = [m for m in _metrics(runs) if m in EDIT_METRICS or m in LIVE_METRICS]
    figure("editing.png", [(m, lambda r, k=m: _series(r, k)) for m in edit_metrics])
    figure("tasks.png", [(t, lambda r, k=t: _series(r, k)) for t in _tasks(runs)], ylog=frozenset({"perplexity"}))
    text = summary_table(runs)
    reading = reading_lines(runs)
    if reading:
        same_end = len({run["rows"][-1]["edits"] for run in runs}) == 1
        where = "final checkpoints" if same_end else \
            "each pair at the last checkpoint both runs reached, named where it is not both runs' final one"
        text += f"\nReading ({where}; where both runs hold per-item outcomes of the same items, a paired "\
                "test: the difference b − a with its 95 % paired-bootstrap interval and p — McNemar's exact test for "\
                "0/1 outcomes, else a sign-flip permutation test — 'real' when p < 0.05, not corrected for the "\
                "number of comparisons; else whether two 95 % intervals overlap, a conservative check):\n\n" \
                + "\n".join(reading) + "\n"
    written.append(atomic_write_text(out / "summary.md", text))
    written.append(write_json(out / "summary.json", summary_data(runs)))
    return written


def _fmt(value: Any, digits: int = 3) -> str:
    if not _number(value):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _fmt_num(value: Any) -> str:
    """Three decimals below 10, one from 10 on (perplexity, κ, σ)."""
    return _fmt(float(value), 1 if abs(value) >= 10 else 3) if _number(value) else "–"


def _fmt_score(mean: float | None, interval: list[float] | None) -> str:
    """``0.880 [0.83, 0.92]`` (``53.4 [48.1, 59.0]`` from 10 on); the mean alone without an interval."""
    if mean is None:
        return "–"
    if interval is None:
        return _fmt_num(mean)
    d = 1 if abs(mean) >= 10 else 2
    return f"{_fmt_num(mean)} [{interval[0]:.{d}f}, {interval[1]:.{d}f}]"


def _shared_n(runs: list[Run], metric: str) -> int | None:
    """The final checkpoints' common ``n`` of a metric, if every run that reports one agrees."""
    ns = {_score(run["rows"][-1], metric)[2] for run in runs} - {None}
    return ns.pop() if len(ns) == 1 else None


def summary_table(runs: list[Run]) -> str:
    """Markdown table of each run's final checkpoint (scores with their 95 % intervals and n)."""
    metrics = _metrics(runs)
    shared = {m: _shared_n(runs, m) for m in metrics}
    finals = [run["rows"][-1] for run in runs]
    has_fro = any(_spectral(row, "delta_fro") is not None for row in finals)
    held = [sorted({m["held"] for m in (row.get("matrices") or {}).values() if m.get("held")}) for row in finals]
    head = ["run", "edits", *(f"{m} (n={shared[m]})" if shared[m] is not None else m for m in metrics),
            "κ max", "σmax", "σmin", *(["‖ΔW‖_F"] if has_fro else []), *(["weights"] if any(held) else []),
            "edit s", "PRUNE s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lab, row, weights in zip(_labels(runs), finals, held):
        cells = [lab, str(row["edits"])]
        for m in metrics:
            mean, interval, n = _score(row, m)
            cell = _fmt_score(mean, interval)
            if mean is not None and n is not None and shared[m] is None:
                cell += f" (n={n})"
            cells.append(cell)
        cells += [_fmt_num(_spectral(row, k)) for k in ("condition_number", "sigma_max", "sigma_min")]
        if has_fro:
            cells.append(_fmt_num(_spectral(row, "delta_fro")))
        if any(held):
            cells.append(", ".join(weights) or "–")
        seconds = row.get("seconds") or {}
        cells += [_fmt(seconds.get("edit"), 0), _fmt(seconds.get("restrain"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _is_reference(run: Run) -> bool:
    """An unrestrained run or plain PRUNE: what every variant is compared against."""
    c = run["config"]
    plain = not isinstance(c.get("variant"), dict) and c.get("threshold_scale", 1.0) == 1.0 \
        and c.get("protect_energy") is None
    return plain


def _pairs(runs: list[Run]) -> list[tuple[int, int]]:
    """Every pair of up to three runs; from four on, each run against the reference runs."""
    pairs = [(i, j) for i in range(len(runs)) for j in range(i + 1, len(runs))]
    if len(runs) <= 3:
        return pairs
    refs = {i for i, r in enumerate(runs) if _is_reference(r)}
    return [(i, j) for i, j in pairs if i in refs or j in refs]


def _compared_rows(a: Run, b: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two runs' rows at the last checkpoint both reached (their final rows when they share none):
    two runs of one pass, or of one edit stream stopped at different points, compare on the same edits."""
    rows_a = {r["edits"]: r for r in a["rows"]}
    rows_b = {r["edits"]: r for r in b["rows"]}
    common = set(rows_a) & set(rows_b)
    if not common:
        return a["rows"][-1], b["rows"][-1]
    return rows_a[max(common)], rows_b[max(common)]


_TASK_SAMPLE = ("seed", "limit", "task_data", "corpus")  # what decides which task examples are scored


def _values(values: list[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _paired_test(a: Run, b: Run, ra: dict[str, Any], rb: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """The paired test of one metric between rows ``ra`` of run ``a`` and ``rb`` of run ``b``, or None
    where they hold no paired outcomes of the same items."""
    from .evaluation.intervals import paired_difference, paired_perplexity

    per_metric = metric in EDIT_METRICS or metric in LIVE_METRICS or metric.endswith("_prob")
    if per_metric:
        pa, pb = ra.get("per_edit"), rb.get("per_edit")
        if not pa or not pb or pa.get("ids") != pb.get("ids") or metric not in pa or metric not in pb:
            return None
        result = paired_difference(_values(pa[metric]), _values(pb[metric]))
        return {**result, "edits": ra["edits"], "items": "edits"}
    ia, ib = (ra.get("per_item") or {}).get(metric), (rb.get("per_item") or {}).get(metric)
    if ia is None or ib is None or any(a["config"].get(k) != b["config"].get(k) for k in _TASK_SAMPLE):
        return None
    # the checkpoint is named only where it is not simply both runs' last (as for edits, always)
    at = {} if (ra is a["rows"][-1] and rb is b["rows"][-1]) else {"edits": ra["edits"]}
    if "logprob" in ia and "logprob" in ib:
        if ia["tokens"] != ib["tokens"]:  # not the same passages
            return None
        result = paired_perplexity(ia["logprob"], ib["logprob"], ia["tokens"])
        return {**result, "items": "texts", **at}
    if len(ia.get("value", [])) != len(ib.get("value", [])):
        return None
    return {**paired_difference(_values(ia["value"]), _values(ib["value"])), "items": "examples", **at}


def _comparisons(runs: list[Run]) -> list[dict[str, Any]]:
    """Per compared pair of runs and metric, at the last checkpoint both reached: the paired test where
    both hold per-item outcomes of the same items, else whether the intervals overlap (``paired`` None)."""
    labels = _labels(runs)
    metrics = _metrics(runs)
    probs = [f"{m}_prob" for m in EDIT_METRICS if any(r.get("per_edit") for run in runs for r in run["rows"])]
    out = []
    for i, j in _pairs(runs):
        ra, rb = _compared_rows(runs[i], runs[j])
        for metric in [*metrics, *probs]:
            a_mean, a_int, _ = _score(ra, metric)
            b_mean, b_int, _ = _score(rb, metric)
            paired = _paired_test(runs[i], runs[j], ra, rb, metric)
            if paired is None and (a_int is None or b_int is None):
                continue
            overlap = None if a_int is None or b_int is None else a_int[0] <= b_int[1] and b_int[0] <= a_int[1]
            at = None if (ra is runs[i]["rows"][-1] and rb is runs[j]["rows"][-1]) else ra["edits"]
            out.append({"a": labels[i], "b": labels[j], "metric": metric, "overlap": overlap, "paired": paired,
                        "a_mean": a_mean, "a_interval": a_int, "b_mean": b_mean, "b_interval": b_int, "at": at})
    return out


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _paired_line(c: dict[str, Any]) -> str:
    t = c["paired"]
    verdict = "real" if t["p"] < 0.05 else "within noise"
    test = "McNemar" if t["test"] == "mcnemar" else "sign-flip"
    where = f"{t['n']} {t['items']}" + (f" at {t['edits']} edits" if "edits" in t else "")
    if "ratio" in t:  # perplexity
        diff = f"b/a = {t['ratio']:.3f} [{t['interval'][0]:.3f}, {t['interval'][1]:.3f}]"
    else:
        diff = f"b − a = {t['difference']:+.3f} [{t['interval'][0]:+.3f}, {t['interval'][1]:+.3f}]"
    extra = f", {t['discordant'][0]} vs {t['discordant'][1]} discordant" if t.get("discordant") else ""
    scores = ""
    if c["a_mean"] is not None and c["b_mean"] is not None:
        scores = f" {_fmt_score(c['a_mean'], c['a_interval'])} vs {_fmt_score(c['b_mean'], c['b_interval'])};"
    return (f"- {c['metric']} (paired, {where}): a = {c['a']}, b = {c['b']};{scores} {diff}, {test} "
            f"{_p(t['p'])}{extra}: **{verdict}**")


def reading_lines(runs: list[Run]) -> list[str]:
    """One markdown line per metric and compared pair of runs: the paired test where possible, else
    the two scores and whether their intervals overlap (saying that no per-item outcomes were kept)."""
    lines = []
    for c in _comparisons(runs):
        if c["paired"] is not None:
            lines.append(_paired_line(c))
            continue
        if c["overlap"]:
            verdict = "intervals overlap (within noise)"
        else:
            verdict = f"intervals do not overlap ({c['a'] if c['a_mean'] > c['b_mean'] else c['b']} higher)"
        at = "" if c["at"] is None else f" (at {c['at']} edits)"
        lines.append(f"- {c['metric']}{at}: {c['a']} {_fmt_score(c['a_mean'], c['a_interval'])} vs {c['b']} "
                     f"{_fmt_score(c['b_mean'], c['b_interval'])}: {verdict} (no per-item outcomes of the same "
                     f"items in both traces: interval overlap, not a paired test)")
    return lines


def _clean(value: Any) -> Any:
    """NaN and infinities as ``None``, so that ``summary.json`` is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def summary_data(runs: list[Run]) -> dict[str, Any]:
    """The numbers of ``summary.md`` (final checkpoint of each run, and the comparisons) as a dict."""
    metrics = _metrics(runs)
    out_runs = []
    for run, lab in zip(runs, _labels(runs)):
        row = run["rows"][-1]
        scores = {}
        for m in metrics:
            mean, interval, n = _score(row, m)
            if mean is not None:
                scores[m] = {"mean": mean, "interval": interval, "n": n}
        out_runs.append({
            "label": lab, "folder": run["folder"], "restrained": _restrained(run), "edits": row["edits"],
            "final": bool(row.get("final")), "metrics": scores,
            "sources": {k: v for k, v in row.items() if k.endswith("_source") and isinstance(v, str)},
            "spectrum": {k: _spectral(row, k) for k, _ in SPECTRAL},
            "matrices": row.get("matrices") or {}, "seconds": row.get("seconds") or {},
        })
    return _clean({"runs": out_runs, "comparisons": _comparisons(runs)})
