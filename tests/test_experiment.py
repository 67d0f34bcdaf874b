"""Records describe the evaluated weights, and a kill at any moment loses nothing (tiny GPT-2)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model_folder

import prune_ext.evaluation as evaluation
from prune_ext.experiment import ExperimentConfig, ExperimentError, run_experiment, scored_edits
from prune_ext.io import read_jsonl
from prune_ext.session import HELD_EDITED, HELD_RESTRAINED, weight_digest

HERE = Path(__file__).resolve().parent
HPARAMS = {"mom2_n_samples": 3_000, "stats_seq_len": 32, "v_weight_decay": 1e-3, "v_num_grad_steps": 6}
QUIET = {"progress": False, "log": lambda *_: None}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible runs across processes
    monkeypatch.setenv("PRUNE_EXT_CACHE", str(tmp_path / "cache"))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-gpt2"))


def config_for(model_dir: Path, out: Path, **kw) -> ExperimentConfig:
    fields = {"model": str(model_dir), "num_edits": 6, "eval_every": 2, "corpus": str(model_dir / "corpus.txt"),
              "hparams": HPARAMS, **kw}
    return ExperimentConfig(out=str(out), **fields)


def kappa64(weight: torch.Tensor) -> float:
    s = torch.linalg.svdvals(weight.double())
    return float(s[0] / s[-1])


def comparable(rows: list[dict]) -> list[dict]:
    """Rows without their timings (everything else must agree between runs)."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_final_kappa_equals_the_saved_weights(model_dir, tmp_path):
    config = config_for(model_dir, tmp_path / "prune", unrestrained_out=str(tmp_path / "plain"))
    run_experiment(config, **QUIET)
    seen = set()
    for folder, held in (("prune", HELD_RESTRAINED), ("plain", HELD_EDITED)):
        final = read_jsonl(tmp_path / folder / "trace.jsonl")[-1]
        weights = load_file(str(tmp_path / folder / "weights.safetensors"))
        for name, mat in final["matrices"].items():
            weight = weights[f"{name}.weight"]
            assert mat["held"] == held and mat["sha256"] == weight_digest(weight)
            assert kappa64(weight) == pytest.approx(mat["condition_number"], rel=1e-6)
            seen.add(mat["sha256"])
    assert len(seen) == 2, "the restraint changed nothing: the test cannot tell the folders apart"


@pytest.mark.parametrize("editor,batch", [("rome", 1), ("memit", 2)])
def test_every_checkpoint_describes_the_weights_it_evaluated(model_dir, tmp_path, monkeypatch, editor, batch):
    """every-k: each row's numbers come from the matrices the model held while it was scored."""
    held: dict[int, dict[str, torch.Tensor]] = {}
    real = evaluation.evaluate_edits

    def spy(model, tok, requests, *args, **kwargs):
        held[len(requests)] = {name: p.detach().clone() for name, p in model.named_parameters()
                               if "mlp.c_proj" in name}
        return real(model, tok, requests, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_edits", spy)
    config = config_for(model_dir, tmp_path / "every", editor=editor, batch_size=batch, every=2, num_edits=6,
                        eval_every=2)
    run_experiment(config, **QUIET)
    rows = read_jsonl(tmp_path / "every" / "trace.jsonl")
    assert [r["edits"] for r in rows] == [0, 2, 4, 6]
    restrained_any = False
    for row in rows[1:]:
        for name, mat in row["matrices"].items():
            weight = held[row["edits"]][f"{name}.weight"]
            assert mat["sha256"] == weight_digest(weight), (row["edits"], name)
            assert mat["condition_number"] == pytest.approx(kappa64(weight), rel=1e-9)
            assert mat["sigma_max"] == pytest.approx(float(torch.linalg.svdvals(weight.double())[0]), rel=1e-9)
        restrained_any |= row["restraints"] > 0 and any(m["values_above_threshold"] for m in row["matrices"].values())
    assert restrained_any, "no value above the threshold: the restraint was a no-op"
    # the final weights file holds what the last row describes
    weights = load_file(str(tmp_path / "every" / "weights.safetensors"))
    for name in rows[-1]["matrices"]:
        assert torch.equal(weights[f"{name}.weight"], held[6][f"{name}.weight"])


WORKER = """
import os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
os.environ["PRUNE_EXT_CACHE"] = {cache!r}
from test_experiment import config_for, QUIET
from pathlib import Path
import prune_ext.experiment as experiment
from prune_ext.editing import memit
where = {where!r}
calls = [0]
if where == "memit-batch":  # inside the second MEMIT batch, after its first layer was solved
    real_solve = memit.Memit.solve
    def solve(self, *a, **k):
        calls[0] += 1
        if calls[0] == 4:
            os.kill(os.getpid(), 9)
        return real_solve(self, *a, **k)
    memit.Memit.solve = solve
if where == "between-folders":  # after the restrained folder's row at edit 4, before the plain one's
    real_write = experiment._Trace.write
    def write(self, row, weights):
        real_write(self, row, weights)
        if row["edits"] == 4 and self.restrained:
            os.kill(os.getpid(), 9)
    experiment._Trace.write = write
config = config_for(Path({model_dir!r}), Path({out!r}), **{kw!r})
experiment.run_experiment(config, **QUIET)
"""


@pytest.mark.parametrize("where,kw", [
    ("memit-batch", {"editor": "memit", "batch_size": 2, "every": 2}),
    ("between-folders", {"unrestrained_out": "PLAIN"}),
])
def test_a_kill_loses_nothing(model_dir, tmp_path, where, kw):
    out, ref = tmp_path / "run", tmp_path / "ref"
    kw = {k: (str(tmp_path / "run-plain") if v == "PLAIN" else v) for k, v in kw.items()}
    code = textwrap.dedent(WORKER.format(tests=str(HERE), cache=str(tmp_path / "cache"), where=where,
                                         model_dir=str(model_dir), out=str(out), kw=kw))
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (out / "results.json").exists() or not json.loads((out / "results.json").read_text())["final"]
    run_experiment(config_for(model_dir, out, **kw), **QUIET)  # resume
    ref_kw = {k: (str(tmp_path / "ref-plain") if k == "unrestrained_out" else v) for k, v in kw.items()}
    run_experiment(config_for(model_dir, ref, **ref_kw), **QUIET)  # uninterrupted
    pairs = [(out, ref)] + ([(tmp_path / "run-plain", tmp_path / "ref-plain")] if "unrestrained_out" in kw else [])
    for got, want in pairs:
        assert comparable(read_jsonl(got / "trace.jsonl")) == comparable(read_jsonl(want / "trace.jsonl"))
        a, b = load_file(str(got / "weights.safetensors")), load_file(str(want / "weights.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torn_last_line_is_dropped_on_resume(model_dir, tmp_path):
    config = config_for(model_dir, tmp_path / "run", num_edits=4)
    run_experiment(config, **QUIET)
    trace = tmp_path / "run" / "trace.jsonl"
    rows = read_jsonl(trace)
    # as if killed while writing the last row of an older writer: a torn line, and no final result
    lines = trace.read_text().splitlines()
    trace.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    (tmp_path / "run" / "results.json").write_text(json.dumps(rows[-2]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_experiment(config, **QUIET)
    assert any("torn" in str(w.message) for w in caught)
    assert comparable(read_jsonl(trace)) == comparable(rows)


def test_resume_refuses_changed_inputs(model_dir, tmp_path):
    data = tmp_path / "cf.json"
    records = [{"case_id": i, "prompt": f"The home town of {s} is", "subject": s, "target_new": t,
                "ground_truth": "Nowhere", "rephrase_prompt": f"{s} was born in", "locality_prompt": "The sky is",
                "locality_ground_truth": "blue"}
               for i, (s, t) in enumerate([("Alice Smith", "Paris"), ("Bob Jones", "Tokyo"), ("Carol White", "Oslo")])]
    data.write_text(json.dumps(records))
    config = config_for(model_dir, tmp_path / "run", data=str(data), num_edits=3, eval_every=1)
    run_experiment(config, **QUIET)
    assert read_jsonl(tmp_path / "run" / "trace.jsonl")[-1]["final"]
    records[1]["target_new"] = "Lima"  # same settings, other content
    data.write_text(json.dumps(records))
    with pytest.raises(ExperimentError, match="inputs"):
        run_experiment(config, **QUIET)
    config2 = config_for(model_dir, tmp_path / "run", data=str(data), num_edits=3, eval_every=1, alpha=1.5)
    with pytest.raises(ExperimentError, match="alpha"):
        run_experiment(config2, **QUIET)


def test_scored_edits_is_all_or_a_fixed_sample_in_edit_order():
    requests = list(range(50))
    assert scored_edits(requests, 8, None, 0) == list(range(8)) == scored_edits(requests, 8, 8, 0)
    sample = scored_edits(requests, 40, 10, 0)
    assert len(sample) == len(set(sample)) == 10 and sample == sorted(sample) and max(sample) < 40
    assert sample == scored_edits(requests, 40, 10, 0)  # both folders of a run score the same edits
    assert sample != scored_edits(requests, 40, 10, 1)


def test_sampled_edit_scores_and_a_folder_older_than_a_setting_resumes(model_dir, tmp_path):
    config = config_for(model_dir, tmp_path / "run", num_edits=4, eval_edits=3)
    run_experiment(config, **QUIET)
    rows = read_jsonl(tmp_path / "run" / "trace.jsonl")
    counts = [(r["edits"], r["edits_scored"], r.get("n", {}).get("efficacy", 0)) for r in rows]
    assert counts == [(0, 0, 0), (2, 2, 2), (4, 3, 3)]
    # a folder written before `eval_edits` existed ran with its default: it resumes (here, extends)
    old = config_for(model_dir, tmp_path / "old", num_edits=4)
    run_experiment(old, **QUIET)
    saved = json.loads((tmp_path / "old" / "config.json").read_text())
    del saved["eval_edits"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    run_experiment(config_for(model_dir, tmp_path / "old", num_edits=6), **QUIET)
    assert [r["edits"] for r in read_jsonl(tmp_path / "old" / "trace.jsonl")] == [0, 2, 4, 6]


def test_identical_weights_are_scored_once(model_dir, tmp_path, monkeypatch):
    calls = []
    real = evaluation.evaluate_edits
    monkeypatch.setattr(evaluation, "evaluate_edits", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    config = config_for(model_dir, tmp_path / "prune", unrestrained_out=str(tmp_path / "plain"), num_edits=4)
    run_experiment(config, **QUIET)
    prune, plain = (read_jsonl(tmp_path / f / "trace.jsonl") for f in ("prune", "plain"))
    for a, b in zip(prune, plain):
        digests_equal = all(a["matrices"][k]["sha256"] == b["matrices"][k]["sha256"] for k in a["matrices"])
        if digests_equal:  # scored once: one row names the folder whose scores it holds
            assert ("scores_from" in a) != ("scores_from" in b)
            assert {k: v for k, v in a.items() if k in ("efficacy", "locality", "n", "intervals")} == \
                   {k: v for k, v in b.items() if k in ("efficacy", "locality", "n", "intervals")}
        else:
            assert "scores_from" not in a and "scores_from" not in b
    assert plain[0]["scores_from"] == "restrained"  # the unedited model: W + F(0) = W
    assert len(calls) == sum("scores_from" not in r for r in prune + plain if r["edits"])


def test_once_schedule_rows_and_nan_free(model_dir, tmp_path):
    config = config_for(model_dir, tmp_path / "prune", unrestrained_out=str(tmp_path / "plain"), num_edits=4)
    run_experiment(config, **QUIET)
    prune, plain = (read_jsonl(tmp_path / f / "trace.jsonl") for f in ("prune", "plain"))
    assert [r["edits"] for r in prune] == [r["edits"] for r in plain] == [0, 2, 4]
    for a, b in zip(prune[1:], plain[1:]):
        (ma,), (mb,) = a["matrices"].values(), b["matrices"].values()
        assert ma["held"] == HELD_RESTRAINED and mb["held"] == HELD_EDITED
        assert ma["values_above_threshold"] == mb["values_above_threshold"] > 0
        assert not math.isnan(ma["condition_number"])
        assert ma["sha256"] != mb["sha256"] and ma["delta_sigma_max"] != mb["delta_sigma_max"]


def test_a_run_extended_to_more_edits_equals_the_longer_run(model_dir, tmp_path):
    short = config_for(model_dir, tmp_path / "run", unrestrained_out=str(tmp_path / "run-plain"), num_edits=4)
    run_experiment(short, **QUIET)
    longer = config_for(model_dir, tmp_path / "run", unrestrained_out=str(tmp_path / "run-plain"), num_edits=6)
    run_experiment(longer, **QUIET)  # the same command with a larger --num-edits goes on from edit 4
    ref = config_for(model_dir, tmp_path / "ref", unrestrained_out=str(tmp_path / "ref-plain"), num_edits=6)
    run_experiment(ref, **QUIET)
    for got, want in (("run", "ref"), ("run-plain", "ref-plain")):
        a, b = read_jsonl(tmp_path / got / "trace.jsonl"), read_jsonl(tmp_path / want / "trace.jsonl")
        assert [r["final"] for r in a] == [False, False, False, True]
        # the same weights and scores at every checkpoint; the record also counts the once-at-the-end
        # restraint the short run made at edit 4 (the books kept ΔW, so it changed nothing after)
        drop = {"final", "restraints"}
        assert [{k: v for k, v in r.items() if k not in drop} for r in comparable(a)] == \
            [{k: v for k, v in r.items() if k not in drop} for r in comparable(b)]
        wa = load_file(str(tmp_path / got / "weights.safetensors"))
        wb = load_file(str(tmp_path / want / "weights.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ExperimentError, match="more than"):
        run_experiment(config_for(model_dir, tmp_path / "run", unrestrained_out=str(tmp_path / "run-plain"),
                                  num_edits=2), **QUIET)


def test_config_records_the_thread_count_of_each_pass(model_dir, tmp_path):
    out, said = tmp_path / "run", []
    run_experiment(config_for(model_dir, out, num_edits=2), **QUIET)
    assert json.loads((out / "config.json").read_text())["threads"] == [{"from_edits": 0, "threads": 1}]
    torch.set_num_threads(2)  # (the fixture restores it)
    run_experiment(config_for(model_dir, out, num_edits=4), progress=False, log=said.append)
    assert json.loads((out / "config.json").read_text())["threads"] == [
        {"from_edits": 0, "threads": 1}, {"from_edits": 2, "threads": 2}]
    assert any("2 CPU thread(s), the run so far on 1" in line for line in said), said


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


def test_variant_outputs_hold_their_variant_and_pair_by_edit(llama_dir, tmp_path):
    """--variant-out: each folder holds W + variant(ΔW) of the same pass (checked against the float64
    reference of test_spectral), rows carry per-edit outcomes with the same ids, and a variant added
    when the run is resumed starts from there and says so."""
    from safetensors.torch import load_file as load
    from test_spectral import _reference

    from prune_ext.spectral import parse_restraint

    variants = {str(tmp_path / "half"): "scale=0.3", str(tmp_path / "protect"): "restrain=none,protect=0.5,damp=1"}
    config = config_for(llama_dir, tmp_path / "prune", unrestrained_out=str(tmp_path / "plain"), num_edits=4,
                        variant_outs=variants)
    run_experiment(config, **QUIET)
    base = load(str(llama_dir / "model.safetensors"))
    plain = load_file(str(tmp_path / "plain" / "weights.safetensors"))
    rows = {f: read_jsonl(tmp_path / f / "trace.jsonl") for f in ("prune", "plain", "half", "protect")}
    assert all([r["edits"] for r in rs] == [0, 2, 4] for rs in rows.values())
    for folder, spec in variants.items():
        cfg = json.loads((Path(folder) / "config.json").read_text())
        assert cfg["variant"]["spec"] == parse_restraint(spec, parse_restraint("restrain=log,alpha=1.2")).spec()
        got = load_file(str(Path(folder) / "weights.safetensors"))
        for key, held in got.items():
            W = base[key]
            want = W.double() + _reference(plain[key].double() - W.double(), W, parse_restraint(spec))
            assert float((held.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())
    digests = {f: next(iter(rs[-1]["matrices"].values()))["sha256"] for f, rs in rows.items()}
    assert len(set(digests.values())) == 4, "every variant changed the weights (else the test tells nothing)"
    for rs in rows.values():
        for row in rs[1:]:
            per = row["per_edit"]
            assert per["ids"] == list(range(row["edits"]))
            assert len(per["efficacy"]) == len(per["efficacy_prob"]) == len(per["ids"])
            assert sum(per["efficacy"]) / len(per["ids"]) == pytest.approx(row["efficacy"])
    # resume the pass to 6 edits with one more variant: its rows begin at the first checkpoint from the
    # point the pass resumed at (here 4, a checkpoint: the books hold exactly the 4 edits)
    more = {**variants, str(tmp_path / "late"): "scale=0.5"}
    run_experiment(config_for(llama_dir, tmp_path / "prune", unrestrained_out=str(tmp_path / "plain"),
                              num_edits=6, variant_outs=more), **QUIET)
    late = read_jsonl(tmp_path / "late" / "trace.jsonl")
    assert [r["edits"] for r in late] == [4, 6]
    assert json.loads((tmp_path / "late" / "config.json").read_text())["added_after_edits"] == 4
    assert [r["edits"] for r in read_jsonl(tmp_path / "half" / "trace.jsonl")] == [0, 2, 4, 6]
