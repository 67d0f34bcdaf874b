"""The report on hand-written run folders: old and new trace formats, intervals, readings, summary.json."""

from __future__ import annotations

import json
import math
import struct
import warnings
from pathlib import Path

import pytest

from prune_ext import report

pytest.importorskip("matplotlib")

CONFIG = {"editor": "rome", "restrain": "log", "alpha": 1.2, "beta": 2.0, "every": None, "unrestrained_out": None}


def _matrix(sigma_max: float, sigma_min: float, **extra) -> dict:
    return {"sigma_max": sigma_max, "sigma_min": sigma_min, "condition_number": sigma_max / sigma_min,
            "delta_sigma_max": 10.0, "delta_rank": 3, "values_above_threshold": 1, "threshold": 22.9, **extra}


def _old_row(edits: int, eff: float, ppl: float, final: bool = False) -> dict:
    """A trace row as the runner wrote it before intervals existed."""
    return {"edits": edits, "final": final, "efficacy": eff, "generalization": eff - 0.1, "locality": 0.6,
            "perplexity": ppl, "matrices": {"model.layers.4.mlp.down_proj": _matrix(30.0, 1.5)},
            "seconds": {"edit": 12.0 * edits, "restrain": 0.01, "eval": 3.0}}


def _new_row(edits: int, eff: float, eff_int: list, ppl: float, ppl_int: list, *, n_ppl: int = 40,
             final: bool = False, held: str = "W+dW", fro: float = 50.0) -> dict:
    row = _old_row(edits, eff, ppl, final)
    row["live_efficacy"] = eff / 2
    row["perplexity_source"] = "RTE premises (sentence1 of rte.tsv)"
    row["n"] = {"efficacy": edits, "generalization": edits, "locality": edits, "live_efficacy": edits,
                "perplexity": n_ppl}
    row["intervals"] = {"efficacy": eff_int, "generalization": [eff - 0.2, eff], "locality": [0.5, 0.7],
                        "live_efficacy": [eff / 2 - 0.1, eff / 2 + 0.1], "perplexity": ppl_int}
    row["matrices"]["model.layers.4.mlp.down_proj"].update(delta_fro=fro, dtype="float32", held=held)
    return row


def _run(folder: Path, rows: list[dict], torn: str | None = None, **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**CONFIG, "out": str(folder), **config}))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "trace.jsonl").write_text(text + (torn or ""))
    return folder


def _png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_old_format_traces_still_report(tmp_path):
    a = _run(tmp_path / "a", [_old_row(0, math.nan, 41.0), _old_row(50, 0.9, 45.2, final=True)])
    b = _run(tmp_path / "b", [_old_row(0, math.nan, 41.0), _old_row(50, 0.8, 57.0, final=True)], restrain="none")
    files = report.write_report([a, b], tmp_path / "out")
    assert {f.name for f in files} == {"spectrum.png", "editing.png", "tasks.png", "summary.md", "summary.json"}
    table = (tmp_path / "out" / "summary.md").read_text()
    head, _, first, second = table.splitlines()[:4]
    assert head == ("| run | edits | efficacy | generalization | locality | perplexity | κ max | σmax | σmin "
                    "| edit s | PRUNE s |")
    assert first == ("| ROME · PRUNE log α=1.2, once | 50 | 0.900 | 0.800 | 0.600 | 45.2 | 20.0 | 30.0 | 1.500 "
                     "| 600 | 0.01 |")
    assert "| ROME · no PRUNE | 50 | 0.800 |" in second and "Reading" not in table  # no intervals: no reading
    data = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert data["runs"][0]["metrics"]["efficacy"] == {"mean": 0.9, "interval": None, "n": None}
    assert data["comparisons"] == []
    assert _png_size(tmp_path / "out" / "spectrum.png")[1] == int((3.4 + 0.4) * 120)  # one row of panels: no ‖ΔW‖_F


def test_new_format_intervals_n_and_readings(tmp_path, monkeypatch):
    prune = _run(tmp_path / "prune", [
        _new_row(0, math.nan, [math.nan, math.nan], 41.0, [38.0, 44.5]),
        _new_row(200, 0.88, [0.83, 0.92], 53.4, [48.1, 59.0], final=True, held="W+F(dW)", fro=61.25),
    ], unrestrained_out=str(tmp_path / "plain"))
    plain = _run(tmp_path / "plain", [
        _new_row(0, math.nan, [math.nan, math.nan], 41.0, [38.0, 44.5]),
        _new_row(200, 0.825, [0.77, 0.87], 470.7, [300.2, 690.0], n_ppl=20, final=True, fro=700.0),
    ], unrestrained_out=str(tmp_path / "plain"))
    import matplotlib.axes

    bands = []
    real = matplotlib.axes.Axes.fill_between
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda self, *a, **k: bands.append(k["color"]) or real(self, *a, **k))
    report.write_report([prune, plain], tmp_path / "out")
    # one band per run in each score panel that has intervals (efficacy, generalization, locality,
    # live_efficacy, perplexity), none in the spectrum panels
    assert len(bands) == 2 * 5
    table = (tmp_path / "out" / "summary.md").read_text()
    head, _, first, second = table.splitlines()[:4]
    assert head.startswith("| run | edits | efficacy (n=200) | generalization (n=200) | locality (n=200) "
                           "| live_efficacy (n=200) | perplexity |")
    assert head.endswith("| κ max | σmax | σmin | ‖ΔW‖_F | weights | edit s | PRUNE s |")
    assert first.startswith("| ROME · PRUNE log α=1.2, once | 200 | 0.880 [0.83, 0.92] | 0.780 [0.68, 0.88] | "
                            "0.600 [0.50, 0.70] | 0.440 [0.34, 0.54] | 53.4 [48.1, 59.0] (n=40) | 20.0 |")
    assert "| 61.2 | W+F(dW) |" in first
    assert second.startswith("| ROME · no PRUNE | 200 | 0.825 [0.77, 0.87] |")
    assert "470.7 [300.2, 690.0] (n=20)" in second and "| 700.0 | W+dW |" in second
    reading = table.split("Reading")[1]
    assert ("- efficacy: ROME · PRUNE log α=1.2, once 0.880 [0.83, 0.92] vs ROME · no PRUNE 0.825 [0.77, 0.87]: "
            "intervals overlap (within noise)") in reading
    assert ("- perplexity: ROME · PRUNE log α=1.2, once 53.4 [48.1, 59.0] vs ROME · no PRUNE 470.7 [300.2, 690.0]: "
            "intervals do not overlap (ROME · no PRUNE higher)") in reading
    assert len([line for line in reading.splitlines() if line.startswith("- ")]) == 5

    def strict(name):
        raise ValueError(f"summary.json holds {name}")

    data = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=strict)
    run = data["runs"][0]
    assert run["restrained"] and not data["runs"][1]["restrained"]
    assert run["metrics"]["efficacy"] == {"mean": 0.88, "interval": [0.83, 0.92], "n": 200}
    assert run["metrics"]["perplexity"] == {"mean": 53.4, "interval": [48.1, 59.0], "n": 40}
    assert run["sources"] == {"perplexity_source": "RTE premises (sentence1 of rte.tsv)"}
    assert run["spectrum"]["delta_fro"] == 61.25 and run["spectrum"]["condition_number"] == 20.0
    assert run["matrices"]["model.layers.4.mlp.down_proj"]["held"] == "W+F(dW)"
    overlaps = {c["metric"]: c["overlap"] for c in data["comparisons"]}
    assert overlaps == {"efficacy": True, "generalization": True, "locality": True, "live_efficacy": True,
                        "perplexity": False}
    # ‖ΔW‖_F is a fourth spectrum panel: two rows of panels
    assert _png_size(tmp_path / "out" / "spectrum.png")[1] == int((2 * 3.4 + 0.4) * 120)


def test_torn_last_line_is_dropped_with_one_warning(tmp_path):
    rows = [_old_row(0, math.nan, 41.0), _old_row(25, 0.95, 42.0)]
    folder = _run(tmp_path / "run", rows, torn='{"edits": 50, "final": true, "efficacy": 0.9')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = report.load_run(folder)
    assert [r["edits"] for r in run["rows"]] == [0, 25]
    assert len(caught) == 1 and "torn last line" in str(caught[0].message)
    (folder / "trace.jsonl").write_text('{"edits": 0}\n{broken\n{"edits": 5}\n')
    with pytest.raises(ValueError, match="line 2"):  # not the last line: not a torn write
        report.load_run(folder)


def test_labels_name_the_encore_options(tmp_path):
    rows = [_old_row(50, 0.9, 45.2, final=True)]
    mpes = _run(tmp_path / "a", rows, editor="alphaedit", hparams={"mpes": True})
    both = _run(tmp_path / "b", rows, editor="memit", restrain="none", hparams={"mpes": True, "norm_constraint": 0.5})
    assert report.label(report.load_run(mpes)) == "ALPHAEDIT+MPES · PRUNE log α=1.2, once"
    assert report.label(report.load_run(both)) == "MEMIT+MPES+norm μ=0.5 · no PRUNE"


def test_mixed_formats_and_duplicate_labels(tmp_path):
    old = _run(tmp_path / "old", [_old_row(50, 0.9, 45.2, final=True)])
    new = _run(tmp_path / "new", [_new_row(50, 0.7, [0.6, 0.8], 44.0, [40.0, 48.0], final=True)])
    table = report.summary_table([report.load_run(old), report.load_run(new)])
    lines = table.splitlines()
    assert "efficacy (n=50)" in lines[0]  # the one run that reports n sets the header
    assert "| ROME · PRUNE log α=1.2, once (old) | 50 | 0.900 |" in lines[2]
    assert "| ROME · PRUNE log α=1.2, once (new) | 50 | 0.700 [0.60, 0.80] |" in lines[3]
    assert report.reading_lines([report.load_run(old), report.load_run(new)]) == []  # old has no intervals


def _paired_row(edits: int, flags: list[int], probs: list[float], ppl_logprobs: list[float], **kw) -> dict:
    row = _new_row(edits, sum(flags) / len(flags), [0.0, 1.0], 40.0, [38.0, 42.0], **kw)
    row["per_edit"] = {"ids": list(range(len(flags))), "efficacy": flags, "efficacy_prob": probs}
    row["per_item"] = {"perplexity": {"logprob": ppl_logprobs, "tokens": [10] * len(ppl_logprobs)}}
    return row


def test_paired_readings_when_rows_share_edits(tmp_path):
    from prune_ext.evaluation.intervals import mcnemar_exact, paired_perplexity

    flags_a = [1] * 30 + [0] * 10
    flags_b = [0] * 12 + [1] * 18 + [1] * 1 + [0] * 9  # 12 edits lost, 1 gained
    probs = [0.6] * 40
    lp = [-20.0] * 40
    a = _run(tmp_path / "a", [_paired_row(40, flags_a, probs, lp, final=True)])
    b = _run(tmp_path / "b", [_paired_row(40, flags_b, [0.6] * 40, [-21.0] * 40, final=True)],
             variant={"spec": "restrain=none,protect=0.5,damp=1", "label": "protect 50 % (d=1)"})
    lines = report.reading_lines([report.load_run(a), report.load_run(b)])
    eff = next(line for line in lines if line.startswith("- efficacy (paired"))
    p = mcnemar_exact(12, 1)
    assert f"p = {p:.3f}" in eff and "12 vs 1 discordant" in eff and "**real**" in eff and "40 edits" in eff
    assert "protect 50 % (d=1), once" in eff  # the variant labels its run
    prob = next(line for line in lines if line.startswith("- efficacy_prob (paired"))
    assert "**within noise**" in prob and "+0.000" in prob
    ppl = next(line for line in lines if line.startswith("- perplexity (paired"))
    want = paired_perplexity(lp, [-21.0] * 40, [10] * 40)
    assert f"b/a = {want['ratio']:.3f}" in ppl and "**real**" in ppl
    # a run of an older writer (no per-edit outcomes): the overlap reading, saying why
    c = _run(tmp_path / "c", [_new_row(40, 0.5, [0.35, 0.65], 41.0, [39.0, 43.0], final=True)])
    lines = report.reading_lines([report.load_run(a), report.load_run(c)])
    assert any(line.startswith("- efficacy: ") and "not a paired test" in line for line in lines)
    data = report.summary_data([report.load_run(a), report.load_run(b)])
    assert any(c["paired"] and c["paired"]["test"] == "mcnemar" for c in data["comparisons"])


def test_many_runs_are_compared_against_the_references(tmp_path):
    rows = lambda: [_paired_row(40, [1, 0] * 20, [0.5] * 40, [-20.0] * 40, final=True)]  # noqa: E731
    folders = [_run(tmp_path / "plain", rows(), restrain="none"), _run(tmp_path / "prune", rows()),
               _run(tmp_path / "v1", rows(), threshold_scale=0.5),
               _run(tmp_path / "v2", rows(), protect_energy=0.5, protect_damp=0.8)]
    runs = [report.load_run(f) for f in folders]
    assert report.label(runs[2]).endswith("log α=1.2 above 0.5σ_W, once")
    assert "protect 50 % (d=0.8) + PRUNE log α=1.2, once" in report.label(runs[3])
    pairs = {(c["a"], c["b"]) for c in report._comparisons(runs)}
    labels = report._labels(runs)
    assert (labels[2], labels[3]) not in pairs and len(pairs) == 5  # 6 pairs less variant vs variant


def test_runs_stopped_at_different_points_compare_where_both_were(tmp_path):
    """One edit stream, two runs: one at 80 edits, one stopped at 40. Every reading is at 40 edits,
    the scores shown too, and the perplexity pairs the texts of those two checkpoints."""
    from prune_ext.evaluation.intervals import paired_perplexity

    a40 = _paired_row(40, [1] * 30 + [0] * 10, [0.6] * 40, [-20.0] * 40)
    a80 = _paired_row(80, [1] * 10 + [0] * 30, [0.3] * 40, [-30.0] * 40, final=True)  # other values at 80
    b40 = _paired_row(40, [1] * 20 + [0] * 20, [0.5] * 40, [-22.0] * 40, final=True)
    a = _run(tmp_path / "a", [a40, a80], restrain="none")
    b = _run(tmp_path / "b", [b40], editor="memit", restrain="none")
    runs = [report.load_run(a), report.load_run(b)]
    lines = report.reading_lines(runs)
    eff = next(line for line in lines if line.startswith("- efficacy (paired"))
    assert "40 edits at 40 edits" in eff and "0.750 [0.00, 1.00] vs 0.500" in eff and "-0.250" in eff
    ppl = next(line for line in lines if line.startswith("- perplexity (paired"))
    want = paired_perplexity([-20.0] * 40, [-22.0] * 40, [10] * 40)
    assert "40 texts at 40 edits" in ppl and f"b/a = {want['ratio']:.3f}" in ppl
    # without per-item outcomes: the interval reading, at that checkpoint too, and saying so
    for row in (a40, a80, b40):
        row.pop("per_edit"), row.pop("per_item")
    a2, b2 = _run(tmp_path / "a2", [a40, a80], restrain="none"), _run(tmp_path / "b2", [b40], editor="memit")
    lines = report.reading_lines([report.load_run(a2), report.load_run(b2)])
    assert any(line.startswith("- efficacy (at 40 edits): ") and "0.750" in line for line in lines)
    report.write_report([a, b], tmp_path / "out")
    assert "each pair at the last checkpoint both runs reached" in (tmp_path / "out" / "summary.md").read_text()
