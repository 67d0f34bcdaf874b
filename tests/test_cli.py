"""The experiment runner, the report and the command line, end to end on a tiny GPT-2."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _refuse_constant(name: str):
    raise AssertionError(f"bare {name} in a JSON file")


def _assert_strict_json_files(folder: Path) -> None:
    """Every .json / .jsonl file under ``folder`` is strict JSON (no NaN / Infinity literals)."""
    files = [p for p in folder.rglob("*") if p.suffix in (".json", ".jsonl")]
    assert files
    for path in files:
        text = path.read_text()
        docs = text.splitlines() if path.suffix == ".jsonl" else [text]
        for doc in docs:
            json.loads(doc, parse_constant=_refuse_constant)


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
        _assert_strict_json_files(tmp_path / folder)
        assert rows[0]["efficacy"] is None  # no edit to score yet: NaN is written as null
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


def test_version_and_help_on_every_option_with_defaults(capsys):
    from prune_ext.cli import _parser

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"prune-ext {prune_ext.__version__}"
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"run", "report", "demo", "bench", "restrain", "export", "train-mend"}
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"prune-ext {name} {action.option_strings or action.dest}: no help"
    text = commands["run"].format_help()
    for shown in ("(default: 1.2)", "(default: log)", "(default: 25)", "(default: smollm2-135m)"):
        assert shown in " ".join(text.split()), shown
    assert "(default: None)" not in text and "(default: False)" not in text


def test_bench_goes_through_argparse(monkeypatch, capsys):
    import prune_ext.bench as bench

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0 and "--shapes" in capsys.readouterr().out
    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv))
    assert main(["bench", "--ranks", "10", "--no-dense"]) == 0 and seen == [["--ranks", "10", "--no-dense"]]
    with pytest.raises(SystemExit) as exc:  # other commands still refuse unknown options
        main(["restrain", "--base", "a", "--edited", "b", "--out", "c", "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_failed_start_leaves_no_output_folder(model_dir, tmp_path, capsys, monkeypatch):
    """Inputs are checked before anything is written; a failure after the folders were made removes them."""
    import prune_ext.editing as editing

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRUNE_EXT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "not-a-model").mkdir()
    for argv, message in (
        (["--model", str(tmp_path / "missing")], "neither 'smollm2-135m', a local model folder nor a Hub id"),
        (["--model", str(tmp_path / "not-a-model")], "without config.json"),
        (["--model", str(model_dir), "--tasks", "rte", "--task-data", str(tmp_path / "nodata")], "rte"),
    ):
        assert main(["run", *argv, "--out", "new/x", "--unrestrained-out", "new/y"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("prune-ext: error:") and message in err and "\n" not in err
        assert not (tmp_path / "new").exists()

    def broken(*args, **kwargs):
        raise ValueError("the model file is corrupt")

    monkeypatch.setattr(editing, "load_model", broken)  # fails after the folders were started
    (tmp_path / "kept").mkdir()
    argv = ["run", "--model", str(model_dir), "--out", "kept/new/x", "--unrestrained-out", "other/y"]
    assert main(argv) == 2 and "corrupt" in capsys.readouterr().err
    assert not (tmp_path / "other").exists() and not (tmp_path / "new").exists()
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())  # one that was there stays


def test_no_default_data_folder_outside_the_checkout(tmp_path, capsys, monkeypatch):
    import prune_ext.evaluation.tasks as tasks

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRUNE_EXT_DATA", raising=False)
    monkeypatch.setattr(tasks, "__file__", str(tmp_path / "site-packages" / "prune_ext" / "evaluation" / "tasks.py"))
    assert main(["run", "--tasks", "rte", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--task-data" in err and "PRUNE_EXT_DATA" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
    monkeypatch.setenv("PRUNE_EXT_DATA", str(tmp_path / "data"))
    assert tasks.resolve_data_dir() == tmp_path / "data"


@pytest.mark.parametrize(("command", "target", "says"), [
    (["run", "--out", "x"], "prune_ext.experiment.run_experiment", "run the same command again to resume"),
    (["restrain", "--base", "a", "--edited", "b", "--out", "c"], "prune_ext.posthoc.restrain_folder",
     "no output folder was left behind"),
    (["export", "r", "--hf", "h"], "prune_ext.export.export_hf", "no output folder was left behind"),
])
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupts_say_what_happens_next(command, target, says, how, monkeypatch, capsys, tmp_path):
    """Ctrl-C and SIGTERM end every command with exit 130; only the commands that resume say so."""
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # the handler main() installed turns it into an interrupt
            signal.pause()  # not reached: the handler raises
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert main(command) == 130
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err.strip()
    assert err == f"prune-ext: interrupted; {says}"
    assert ("resume" in err) == (command[0] == "run")


def test_model_from_the_local_hugging_face_cache(model_dir, tmp_path):
    """--model org/name loads from the local cache (HF_HUB_OFFLINE honoured); one line when it is not there."""
    snapshot = tmp_path / "hf" / "hub" / "models--someorg--tiny-gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name != "corpus.txt":
            (snapshot / item.name).write_bytes(item.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(prune_ext.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    code = f"""
import torch
from prune_ext.editing import load_model
from prune_ext.editing.models import check_model
cached, tok = load_model("someorg/tiny-gpt2")
local, _ = load_model({str(model_dir)!r})
ids = tok("The capital of France is", return_tensors="pt").input_ids
with torch.no_grad():
    assert torch.equal(cached(ids).logits, local(ids).logits)
try:
    check_model("someorg/not-cached")
except FileNotFoundError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip()
    assert "--model someorg/not-cached: not in the local Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
    assert "\n" not in line


def test_thread_policy(monkeypatch):
    """OMP_NUM_THREADS is honoured; else the cores not busy, at least 1; OpenMP threads wait passively
    when other work is busy."""
    from prune_ext.cli import thread_policy

    threads = torch.get_num_threads()
    try:
        env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
        assert thread_policy(env) == 3 and env["OMP_WAIT_POLICY"] == "ACTIVE" and torch.get_num_threads() == 3
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        for load, want in ((0.2, 4), (1.4, 3), (2.6, 1), (9.0, 1)):
            env = {}
            assert thread_policy(env, busy=load) == want
            passive = {"OMP_WAIT_POLICY": "PASSIVE"} if load >= 0.5 else {}  # an idle machine keeps spinning
            assert env == {"OMP_NUM_THREADS": str(want), **passive}
    finally:
        torch.set_num_threads(threads)


def test_busy_cores_counts_a_busy_process():
    """The sample sees a spinning child process as about one busy core (the machine's other work adds)."""
    from prune_ext.cli import busy_cores

    idle = busy_cores(0.3)
    assert 0.0 <= idle <= (os.cpu_count() or 1) + 1e-9
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        assert busy_cores(0.5) >= 0.7
    finally:
        spin.kill()
        spin.wait()
