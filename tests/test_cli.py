"""The experiment runner, the report and the command line, end to end on a tiny GPT-2."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model_folder

import prune_ext
from prune_ext.cli import main
from prune_ext.experiment import ExperimentConfig, ExperimentError, run_experiment
from prune_ext.report import load_run, write_report

HPARAMS = {"mom2_n_samples": 3_000, "stats_seq_len": 32, "v_weight_decay": 1e-3, "v_num_grad_steps": 6}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-gpt2"))


def test_run_writes_trace_results_and_both_variants(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNE_EXT_CACHE", str(tmp_path / "cache"))
    config = ExperimentConfig(out=str(tmp_path / "prune"), unrestrained_out=str(tmp_path / "plain"),
                              model=str(model_dir), num_edits=4, eval_every=2, corpus=str(model_dir / "corpus.txt"),
                              hparams=HPARAMS)
    final = run_experiment(config, progress=False, log=lambda *_: None)
    assert final["final"] and final["edits"] == 4
    for folder in ("prune", "plain"):
        rows = [json.loads(line) for line in (tmp_path / folder / "trace.jsonl").read_text().splitlines()]
        assert [r["edits"] for r in rows] == [0, 2, 4] and rows[-1]["final"]
        for row in rows[1:]:
            assert {"efficacy", "generalization", "locality", "matrices", "seconds"} <= set(row)
            (mat,) = row["matrices"].values()
            assert mat["condition_number"] == pytest.approx(mat["sigma_max"] / mat["sigma_min"])
        assert json.loads((tmp_path / folder / "results.json").read_text()) == rows[-1]
        # the once-at-the-end restraint is computed (and timed) at each checkpoint of the restrained run
        assert (rows[-1]["seconds"]["restrain"] > 0) == (folder == "prune")
    # the two folders share every edit; they differ only by the restraint
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    (mat,) = final["matrices"].values()
    (mat_plain,) = plain["matrices"].values()
    # the restrained folder describes W + F(ΔW): its ΔW's top value is F of the unrestrained one's
    f_top = prune_ext.restrain_values(torch.tensor([mat_plain["delta_sigma_max"]], dtype=torch.float64),
                                      mat["threshold"], 1.2)
    assert mat["delta_sigma_max"] == pytest.approx(float(f_top[0]), rel=1e-5)
    assert (mat["held"], mat_plain["held"]) == ("W+F(dW)", "W+dW")
    assert mat["values_above_threshold"] > 0 and mat["sigma_max"] != mat_plain["sigma_max"]
    # a complete run is not redone; a changed setting is refused
    assert run_experiment(config, progress=False, log=lambda *_: None) == final
    config.alpha = 1.5
    with pytest.raises(ExperimentError, match="alpha"):
        run_experiment(config, progress=False, log=lambda *_: None)
    # the report
    files = write_report([tmp_path / "prune", tmp_path / "plain"], tmp_path / "report")
    assert {f.name for f in files} == {"spectrum.png", "editing.png", "summary.md", "summary.json"}
    assert all(f.stat().st_size > 1000 for f in files if f.suffix == ".png")
    table = (tmp_path / "report" / "summary.md").read_text()
    assert "PRUNE log α=1.2, once" in table and "no PRUNE" in table
    assert len(load_run(tmp_path / "prune")["rows"]) == 3


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "--data", "/no/such.json", "--out", "x"], "no such file"),
        (["run", "--num-edits", "0", "--out", "x"], "--num-edits must be at least 1"),
        (["run", "--alpha", "1.0", "--out", "x"], "--alpha must be"),
        (["run", "--editor", "rome", "--batch-size", "4", "--out", "x"], "one request at a time"),
        (["run", "--editor", "rome", "--norm-constraint", "2", "--out", "x"], "rome has no setting(s) norm_constraint"),
        (["run", "--every", "5", "--unrestrained-out", "y", "--out", "x"], "once at the end"),
        (["run", "--tasks", "chess", "--out", "x"], "chess"),
        (["run", "--tasks", "rte,samsum", "--limit", "rte=5", "--out", "x"], "--limit names no count for samsum"),
        (["run", "--limit", "rte=0", "--tasks", "rte", "--out", "x"], "--limit: every count must be at least 1"),
        (["run", "--eval-edits", "0", "--out", "x"], "--eval-edits must be at least 1"),
        (["report", "/no/such/run", "--out", "x"], "not a prune-ext run folder"),
    ],
)
def test_bad_arguments_give_one_clear_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prune-ext: error:") and message in err and "\n" not in err


def test_malformed_data_names_the_record(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "The capital of {} is", "subject": "France"}]))
    assert main(["run", "--data", str(bad), "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "prune-ext: error:" in err and "target_new" in err


def test_editor_choices_come_from_the_registry_and_flags_become_hparams(monkeypatch, tmp_path):
    import prune_ext.experiment as experiment
    from prune_ext.editing import EDITORS

    seen = []
    monkeypatch.setattr(experiment, "run_experiment", lambda config: seen.append(config) or {"edits": 0})
    monkeypatch.chdir(tmp_path)
    assert "alphaedit" in EDITORS
    argv = ["run", "--editor", "alphaedit", "--batch-size", "100", "--mpes", "--norm-constraint", "10", "--out", "x"]
    assert main(argv) == 0
    assert seen[0].editor == "alphaedit" and seen[0].hparams == {"mpes": True, "norm_constraint": 10.0}
    seen[0].validate()  # the registry's editor and its settings pass
    assert main(["run", "--editor", "memit", "--out", "y"]) == 0 and seen[1].hparams == {}
