"""Where the model lives: dtypes, device maps and offloaded modules, through the command line (CPU).

The CUDA versions of these runs are in tests/test_cuda.py (run by scripts/gpu_check.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model_folder

from prune_ext.cli import main
from prune_ext.editing import load_model
from prune_ext.io import read_jsonl
from prune_ext.session import EditingSession

HERE = Path(__file__).resolve().parent
HPARAMS = {"mom2_n_samples": 3_000, "stats_seq_len": 32, "v_weight_decay": 1e-3, "v_num_grad_steps": 6}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch, tmp_path):
    torch.set_num_threads(1)
    monkeypatch.setenv("PRUNE_EXT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: tiny_model_folder(root / f"tiny-{arch}", arch) for arch in ("gpt2", "llama")}


def hp_file(folder: Path, hparams: dict) -> str:
    path = folder / "hparams.json"
    path.write_text(json.dumps(hparams))
    return str(path)


def argv(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(folder), "--num-edits", "4", "--eval-every", "2", "--corpus",
            str(folder / "corpus.txt"), "--out", str(out), *extra]


def assert_records_match_weights(out: Path, dtype: str) -> None:
    final = read_jsonl(out / "trace.jsonl")[-1]
    weights = load_file(str(out / "weights.safetensors"))
    for name, mat in final["matrices"].items():
        weight = weights[f"{name}.weight"]
        assert str(weight.dtype) == f"torch.{dtype}" and mat["dtype"] == dtype
        s = torch.linalg.svdvals(weight.double())
        assert float(s[0] / s[-1]) == pytest.approx(mat["condition_number"], rel=1e-6)


WORKER = """
import os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
os.environ["PRUNE_EXT_CACHE"] = {cache!r}
from prune_ext import session as _s
from prune_ext.cli import main
real = _s.EditingSession.edit
def edit(self, step):
    if self.edits_done == 3:
        os.kill(os.getpid(), 9)  # after the checkpoint at 2, before the last edit
    return real(self, step)
_s.EditingSession.edit = edit
main({argv!r})
"""


@pytest.mark.parametrize("arch,dtype", [("llama", "bfloat16"), ("gpt2", "float16")])
def test_half_precision_run_resumes_after_a_kill(folders, tmp_path, monkeypatch, arch, dtype):
    # one thread everywhere, as in the killed worker: the CLI's thread policy would otherwise pick the idle
    # cores for the in-process runs, and a half-precision GEMM split another way rounds differently
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    args = argv(folders[arch], out, "--dtype", dtype, "--hparams", hp_file(tmp_path, HPARAMS))
    code = textwrap.dedent(WORKER.format(tests=str(HERE), cache=str(tmp_path / "cache"), argv=args))
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [r["edits"] for r in read_jsonl(out / "trace.jsonl")] == [0, 2]
    assert main(args) == 0
    rows = read_jsonl(out / "trace.jsonl")
    assert [r["edits"] for r in rows] == [0, 2, 4]
    assert_records_match_weights(out, dtype)
    # an uninterrupted run ends with the same weights
    ref = tmp_path / "ref"
    assert main(argv(folders[arch], ref, "--dtype", dtype, "--hparams", hp_file(tmp_path, HPARAMS))) == 0
    a, b = load_file(str(out / "weights.safetensors")), load_file(str(ref / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_explicit_device_map_over_cpu_entries(folders, tmp_path):
    folder = folders["llama"]
    mapping = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
               **{f"model.layers.{i}": "cpu" for i in range(4)}}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    out = tmp_path / "mapped"
    assert main(argv(folder, out, "--device-map", str(tmp_path / "map.json"), "--hparams",
                     hp_file(tmp_path, HPARAMS))) == 0
    assert_records_match_weights(out, "float32")


def test_an_offloaded_edited_module_is_refused(folders, tmp_path, capsys):
    folder = folders["llama"]
    mapping = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
               **{f"model.layers.{i}": "disk" if i == 0 else "cpu" for i in range(4)}}
    model, tok = load_model(str(folder), device_map=mapping)
    name = "model.layers.0.mlp.down_proj"
    with pytest.raises(ValueError, match=f"{name} is offloaded"):
        EditingSession(model, tok, "rome", {"layer": 0, **HPARAMS}, progress=False)
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    code = main(argv(folder, tmp_path / "off", "--device-map", str(tmp_path / "map.json"), "--hparams",
                     hp_file(tmp_path, {"layer": 0, **HPARAMS})))
    err = capsys.readouterr().err.strip().split("\n")[-1]  # after the loader's progress bar
    assert code == 2 and err.startswith("prune-ext: error:") and "offloaded" in err


def test_bad_placement_gives_one_line(folders, tmp_path, capsys):
    for extra, message in ((["--dtype", "int8"], "invalid choice"), (["--device-map", "nope"], "--device-map"),
                           (["--device", "cpu", "--device-map", "auto"], "not both")):
        with pytest.raises(SystemExit) if message == "invalid choice" else _nothing():
            code = main(argv(folders["gpt2"], tmp_path / "bad", *extra))
            assert code == 2
        err = capsys.readouterr().err
        assert message in err
        assert not (tmp_path / "bad" / "trace.jsonl").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_run_keeps_books_and_restraint_on_the_gpu(folders, tmp_path, dtype):
    out = tmp_path / "cuda"
    assert main(argv(folders["llama"], out, "--device", "cuda", "--dtype", dtype, "--every", "2",
                     "--hparams", hp_file(tmp_path, HPARAMS))) == 0
    assert_records_match_weights(out, dtype)
    model, tok = load_model(str(folders["llama"]), dtype, device="cuda")
    session = EditingSession(model, tok, "rome", HPARAMS, progress=False)
    (ledger,) = session.ledgers.values()
    assert ledger.original.device.type == "cuda"  # so the restraint runs with the CUDA kernels


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than two CUDA devices")
def test_two_gpu_device_map(folders, tmp_path):
    mapping = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
               **{f"model.layers.{i}": 0 if i < 2 else 1 for i in range(4)}}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    out = tmp_path / "two"
    assert main(argv(folders["llama"], out, "--device-map", str(tmp_path / "map.json"), "--editor", "memit",
                     "--batch-size", "2", "--hparams", hp_file(tmp_path, {**HPARAMS, "layers": [1, 2]}))) == 0
    assert_records_match_weights(out, "float32")
