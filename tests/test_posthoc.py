"""Post-hoc restraint of edited checkpoints: in memory, on Hugging Face folders, against the session,
bad input, and memory bounded by a few matrices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import matrix_with_spectrum
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import tiny_model

import prune_ext
from prune_ext import reference
from prune_ext.cli import main
from prune_ext.posthoc import INDEX_NAME, REPORT_NAME, PosthocError, restrain_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _low_rank(m: int, n: int, sigma: list[float], seed: int) -> torch.Tensor:
    return matrix_with_spectrum(m, n, torch.tensor(sigma, dtype=torch.float64), seed=seed)


def _edited_pair(tok, arch: str, dtype=torch.float32):
    """A tiny model and a copy with large low-rank ΔW on two MLP output matrices and a changed bias."""
    base = tiny_model(arch, tok, dtype=dtype)
    edited = tiny_model(arch, tok, dtype=dtype)
    names = ([f"transformer.h.{i}.mlp.c_proj.weight" for i in (1, 2)] if arch == "gpt2"
             else [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)])
    params = dict(edited.named_parameters())
    with torch.no_grad():
        for i, name in enumerate(names):
            w = params[name]
            s = prune_ext.spectral_norm(w.float())
            w += _low_rank(*w.shape, [8 * s, 3 * s, 0.5 * s], seed=i).to(dtype)
        norm = "transformer.ln_f.bias" if arch == "gpt2" else "model.norm.weight"
        params[norm] += 0.01
    return base, edited, names, norm


def test_restrain_model_matches_the_reference(tok):
    base, edited, names, norm = _edited_pair(tok, "llama")
    sd = {k: v.clone() for k, v in edited.state_dict().items()}
    reports = restrain_model(base.state_dict(), sd, alpha=1.5)
    assert [r.name for r in reports] == names
    base_sd = base.state_dict()
    for r in reports:
        w, e = base_sd[r.name].double(), edited.state_dict()[r.name].double()
        ref = w + reference.restrain(e - w, r.sigma_w, 1.5)
        assert (sd[r.name].double() - ref).norm() / ref.norm() < 1e-6
        assert r.values_above == 2 and r.certified and r.kappa_after < r.kappa_before
        assert r.sigma_w == pytest.approx(torch.linalg.svdvals(w)[0].item(), rel=1e-6)
    for k, v in sd.items():  # everything else as edited (the changed norm too: not a matrix)
        if k not in names:
            assert torch.equal(v, edited.state_dict()[k])
    assert not torch.equal(sd[norm], base_sd[norm])
    # on a module, in place; the glob picks one matrix
    reports = restrain_model(base, edited, alpha=1.5, modules="*layers.2.*")
    assert [r.name for r in reports] == names[1:]
    torch.testing.assert_close(edited.state_dict()[names[1]], sd[names[1]], rtol=0, atol=1e-6)
    # a ΔW within σ_W is reported and left bit for bit
    small = {"w": base_sd[names[0]] + 1e-3}
    assert restrain_model({"w": base_sd[names[0]]}, small)[0].values_above == 0
    assert torch.equal(small["w"], base_sd[names[0]] + 1e-3)


def test_restrain_model_rejects_nan_and_leaves_the_model_alone(tok):
    base, edited, names, _ = _edited_pair(tok, "gpt2")
    sd = {k: v.clone() for k, v in edited.state_dict().items()}
    sd[names[1]][0, 0] = float("nan")
    before = {k: v.clone() for k, v in sd.items()}
    with pytest.raises(PosthocError, match="NaN or Inf"):
        restrain_model(base.state_dict(), sd)
    assert all(torch.equal(sd[k], before[k]) or k == names[1] for k in sd)
    assert torch.equal(sd[names[0]], before[names[0]])  # the first (valid) matrix was not written either


def _dense_variant_reference(delta, W, *, fn, protect_energy=None, damp=1.0, scale=1.0):
    """float64: protection by W's SVD projectors (the energy cut in a gap of W's spectrum), then F."""
    d, W = delta.double(), W.double()
    if protect_energy is not None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        r = int((torch.cumsum(S**2, 0) / (S**2).sum() < protect_energy).sum()) + 1
        PU, PV = U[:, :r] @ U[:, :r].T, Vh[:r].T @ Vh[:r]
        d = (torch.eye(d.shape[0], dtype=d.dtype) - damp * PU) @ d @ (torch.eye(d.shape[1], dtype=d.dtype) - damp * PV)
    if fn == "none":
        return d
    return reference.restrain(d, scale * float(torch.linalg.matrix_norm(W, 2)), 1.2, fn=fn)


@pytest.mark.parametrize(("fn", "variant"), [
    ("none", {"protect_energy": 0.5, "protect_damp": 1.0}),
    ("none", {"protect_energy": 0.8, "protect_damp": 0.6}),
    ("log", {"protect_energy": 0.5, "protect_damp": 0.8}),
    ("log", {"threshold_scale": 0.5}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_variants_match_the_reference(fn, variant, dtype):
    # W: 4 large values, 8 middle ones, a small tail (energy cuts at 0.5 and 0.8 fall in gaps)
    g = torch.Generator().manual_seed(7)
    s_w = torch.cat([torch.linspace(10, 9, 4), torch.linspace(4, 3, 8), 0.3 * torch.rand(36, generator=g)])
    W = matrix_with_spectrum(48, 72, s_w.double().sort(descending=True).values, seed=1, dtype=dtype)
    delta = _low_rank(48, 72, [30.0, 12.0, 6.0, 2.0], seed=2).to(dtype)
    edited = {"w": W + delta}
    kw = {"protect_damp": variant.get("protect_damp", 1.0), "protect_energy": variant.get("protect_energy"),
          "threshold_scale": variant.get("threshold_scale", 1.0)}
    (report,) = restrain_model({"w": W}, edited, restrain=fn, **kw)
    ref = W.double() + _dense_variant_reference((W + delta).double() - W.double(), W, fn=fn,
                                                protect_energy=kw["protect_energy"], damp=kw["protect_damp"],
                                                scale=kw["threshold_scale"])
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert float((edited["w"].double() - ref).norm() / ref.norm()) < tol
    assert edited["w"].dtype == dtype and report.certified
    assert report.kappa_after == pytest.approx(float(torch.linalg.cond(edited["w"].double())), rel=1e-6)
    if fn == "none":
        assert report.values_above == 0
    else:  # the values of the (protected) ΔW above the threshold
        protected = _dense_variant_reference((W + delta).double() - W.double(), W, fn="none",
                                             protect_energy=kw["protect_energy"], damp=kw["protect_damp"])
        t = kw["threshold_scale"] * float(torch.linalg.svdvals(W.double())[0])
        assert report.values_above == int((torch.linalg.svdvals(protected) > t).sum()) > 0


def test_restrain_none_needs_protection(tok, tmp_path, capsys):
    with pytest.raises(PosthocError, match="restrain='none' without protect_energy"):
        restrain_model({"w": torch.eye(3)}, {"w": 2 * torch.eye(3)}, restrain="none")
    base, edited, names, _ = _edited_pair(tok, "llama")
    b, e = _save(base, tok, tmp_path / "b"), _save(edited, tok, tmp_path / "e")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["restrain", "--base", str(b), "--edited", str(e), "--out", str(tmp_path / "bad"),
                 "--restrain", "none"]) == 2
    assert "without protect_energy" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["restrain", "--base", str(b), "--edited", str(e), "--out", str(out), "--restrain", "none",
                 "--protect-energy", "0.5", "--protect-damp", "0.8"]) == 0
    written, original = _load_tensors(out), base.state_dict()
    for name in names:  # the protected ΔW: smaller, and exactly (I − dP_U) ΔW (I − dP_V)
        w, d = original[name].double(), edited.state_dict()[name].double() - original[name].double()
        ref = w + _dense_variant_reference(d, w, fn="none", protect_energy=0.5, damp=0.8)
        assert float((written[name].double() - ref).norm() / ref.norm()) < 1e-6
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["restrain"] == "none" and report["protect_energy"] == 0.5
    assert [m["name"] for m in report["matrices"]] == names and all(m["values_above"] == 0 for m in report["matrices"])


def _save(model, tok, folder: Path, **kw) -> Path:
    model.save_pretrained(folder, **kw)
    tok.save_pretrained(folder)
    return folder


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize(("arch", "dtype", "shard"), [("gpt2", torch.float32, "4MB"), ("llama", torch.bfloat16, None)])
def test_folders_keep_layout_and_dtype(tok, tmp_path, capsys, arch, dtype, shard):
    base, edited, names, norm = _edited_pair(tok, arch, dtype)
    kw = {"max_shard_size": shard} if shard else {}
    b, e = _save(base, tok, tmp_path / "base", **kw), _save(edited, tok, tmp_path / "edited", **kw)
    out = tmp_path / "out"
    assert main(["restrain", "--base", str(b), "--edited", str(e), "--out", str(out), "--alpha", "1.5"]) == 0
    printed = capsys.readouterr().out
    assert all(n in printed for n in names) and "κ before" in printed
    # the same files (shards, index, config, tokenizer) plus the report; byte-identical index
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in e.iterdir()] + [REPORT_NAME])
    if shard:
        assert (out / INDEX_NAME).read_bytes() == (e / INDEX_NAME).read_bytes()
        assert len(list(out.glob("*.safetensors"))) > 1
    got, want = _load_tensors(out), {k: v.clone() for k, v in edited.state_dict().items() if k in _load_tensors(e)}
    restrain_model(base.state_dict(), want, alpha=1.5)
    assert set(got) == set(want)
    for k in got:
        assert got[k].dtype == dtype
        assert torch.equal(got[k], want[k]), k
    report = json.loads((out / REPORT_NAME).read_text())
    assert [m["name"] for m in report["matrices"]] == names and report["other_changed"] == [norm]
    assert all(m["values_above"] == 2 for m in report["matrices"])
    # loadable by transformers, with the restrained weights
    loaded = transformers_model(out, dtype)
    torch.testing.assert_close(loaded.state_dict()[names[0]], want[names[0]], rtol=0, atol=0)


def transformers_model(folder: Path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)


HPARAMS = {"mom2_n_samples": 5_000, "stats_seq_len": 32, "v_weight_decay": 1e-3, "v_num_grad_steps": 8}
SUBJECTS = ["Alice Smith", "Bob Jones", "Carol White", "Dan Brown", "Eve Black"]
TARGETS = ["Paris", "Tokyo", "Berlin", "Madrid", "Rome"]


def test_same_result_as_the_session(tok, tmp_path):
    from prune_ext.editing import EditRequest
    from prune_ext.session import EditingSession

    model = tiny_model("gpt2", tok)
    _save(model, tok, tmp_path / "base")
    session = EditingSession(model, tok, "rome", HPARAMS, restrain="log", alpha=1.2, cov_cache_dir=tmp_path / "stats",
                             progress=False)
    for s, t in zip(SUBJECTS, TARGETS):
        session.edit(EditRequest(f"The home town of {s}", s, t))
    restrained, plain = session.weights(restrained=True), session.weights(restrained=False)
    (module,) = restrained
    assert session.diagnostics()[module].values_above_threshold > 0, "edits too small to test"
    assert (restrained[module] - plain[module]).abs().max() > 1e-3  # the restraint changes something
    session.hold(restrained=False)  # the model holds W + ΔW: save it as the "edited anywhere" checkpoint
    _save(model, tok, tmp_path / "plain")
    assert main(["restrain", "--base", str(tmp_path / "base"), "--edited", str(tmp_path / "plain"),
                 "--out", str(tmp_path / "out")]) == 0
    got = _load_tensors(tmp_path / "out")
    name = f"{module}.weight"
    # ΔW from the saved float32 weights (W + ΔW rounded once): agreement to float32 rounding of W'
    torch.testing.assert_close(got[name], restrained[module], rtol=1e-5, atol=2e-6 * restrained[module].abs().max())
    others = {k for k in got if k != name}
    base = _load_tensors(tmp_path / "base")
    assert all(torch.equal(got[k], base[k]) for k in others)
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert [m["name"] for m in report["matrices"]] == [name]
    assert report["matrices"][0]["values_above"] == session.diagnostics()[module].values_above_threshold


@pytest.fixture(scope="module")
def pair(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base, edited, names, _ = _edited_pair(tok, "gpt2")
    return _save(base, tok, root / "base", max_shard_size="4MB"), _save(edited, tok, root / "edited",
                                                                        max_shard_size="4MB"), names


def _nan_folder(pair, tmp_path) -> Path:
    folder = tmp_path / "nan"
    folder.mkdir()
    for p in pair[1].iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    shard_of = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    name = pair[2][1]
    tensors = _load_tensors(folder)
    tensors = {k: v for k, v in tensors.items() if shard_of[k] == shard_of[name]}
    tensors[name][3, 4] = float("inf")
    save_file(tensors, str(folder / shard_of[name]), metadata={"format": "pt"})
    return folder


def _other_arch(tok, tmp_path) -> Path:
    return _save(tiny_model("llama", tok), tok, tmp_path / "llama")


def _other_shape(tok, tmp_path) -> Path:
    import transformers

    config = transformers.GPT2Config(n_layer=4, n_embd=64, n_inner=512, n_head=4, n_positions=128,
                                     vocab_size=len(tok), tie_word_embeddings=False)
    return _save(transformers.GPT2LMHeadModel(config), tok, tmp_path / "narrow")


@pytest.mark.parametrize(("case", "message"), [
    ("arch", "mismatched architectures"),
    ("shape", "mismatched shapes"),
    ("missing", "missing files"),
    ("shard", "missing files: shard"),
    ("nan", "NaN or Inf"),
    ("out-is-input", "same folder as --edited"),
    ("out-exists", "already exists"),
    ("alpha", "alpha must be"),
    ("glob", "matches no 2-D weight"),
])
def test_bad_input_one_line_and_nothing_written(pair, tok, tmp_path, capsys, case, message):
    base, edited, _ = pair
    out = tmp_path / "out"
    extra: list[str] = []
    if case == "arch":
        edited = _other_arch(tok, tmp_path)
    elif case == "shape":
        edited = _other_shape(tok, tmp_path)
    elif case == "missing":
        edited = tmp_path / "empty"
        edited.mkdir()
        (edited / "config.json").write_text("{}")
    elif case == "shard":
        edited = tmp_path / "partial"
        edited.mkdir()
        (edited / INDEX_NAME).write_bytes((pair[1] / INDEX_NAME).read_bytes())
    elif case == "nan":
        edited = _nan_folder(pair, tmp_path)
    elif case == "out-is-input":
        out = edited
    elif case == "out-exists":
        out.mkdir()
    elif case == "alpha":
        extra = ["--alpha", "1.0"]
    elif case == "glob":
        extra = ["--modules", "*.nothing.*"]
    before = sorted(p.name for p in tmp_path.iterdir())
    snapshot = {p.name: p.stat().st_mtime_ns for p in Path(edited).iterdir()}
    capsys.readouterr()
    code = main(["restrain", "--base", str(base), "--edited", str(edited), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("prune-ext: error:") and message in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary folder left
    assert {p.name: p.stat().st_mtime_ns for p in Path(edited).iterdir()} == snapshot


# Peak RSS of the worker: VmHWM, the high-water mark of its own address space. ru_maxrss would do on a
# fresh process, but Linux carries a parent's high-water mark into a child across fork and exec, so
# under pytest it reports at least the size of the test process itself (fall back to it without /proc).
RSS_WORKER = """
import json, resource, sys, torch
torch.set_num_threads(1)
from prune_ext.posthoc import restrain_folder
def rss(field):
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = rss("VmRSS")
reports = restrain_folder({base!r}, {edited!r}, {out!r})
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"start": start, "peak": rss("VmHWM"), "ru_maxrss": maxrss,
                   "restrained": sum(r.values_above > 0 for r in reports)}}))
"""


def _measure(base: Path, edited: Path, out: Path) -> dict:
    code = textwrap.dedent(RSS_WORKER.format(base=str(base), edited=str(edited), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_memory_is_bounded_by_a_few_matrices(tmp_path):
    # 24 matrices of 4 MB (96 MB) in three shards, 8 of them edited
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(512, 2048, generator=g) / 45 for i in range(24)}
    edited = {k: v.clone() for k, v in base.items()}
    for i in range(0, 24, 3):
        edited[f"layers.{i}.weight"] += _low_rank(512, 2048, [10.0, 4.0, 1.0], seed=i)
    for name, tensors in (("base", base), ("edited", edited)):
        folder = tmp_path / name
        folder.mkdir()
        weight_map = {}
        for s in range(3):
            file = f"model-{s + 1:05d}-of-00003.safetensors"
            part = {k: tensors[k] for k in list(tensors)[8 * s : 8 * s + 8]}
            save_file(part, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = _measure(tmp_path / "base", tmp_path / "edited", tmp_path / "out")
    model, matrix = _folder_bytes(tmp_path / "base"), 512 * 2048 * 4
    used = got["peak"] - got["start"]
    print(f"peak RSS above the start: {used / 2**20:.1f} MiB (model {model / 2**20:.0f} MiB, matrix "
          f"{matrix / 2**20:.0f} MiB)")
    assert got["restrained"] == 8
    assert used < model + 4 * matrix  # the budget: one model plus a few matrices (both models: 192 MB)
    out = _load_tensors(tmp_path / "out")
    assert out.keys() == base.keys()


@pytest.mark.slow
def test_memory_smollm2_pair(tmp_path):
    setup = f"""
import torch
torch.set_num_threads(1)
from prune_ext.editing import load_model
from prune_ext.export import save_hf_folder
import prune_ext
model, tok = load_model("smollm2-135m")
save_hf_folder(model, tok, {str(tmp_path / "base")!r})
with torch.no_grad():
    for i in range(3, 8):
        w = model.get_submodule(f"model.layers.{{i}}.mlp.down_proj").weight
        s = prune_ext.spectral_norm(w)
        u = torch.linalg.qr(torch.randn(w.shape[0], 4))[0]
        v = torch.linalg.qr(torch.randn(w.shape[1], 4))[0]
        w += (u * torch.tensor([6.0, 3.0, 1.5, 0.5]) * s) @ v.T
save_hf_folder(model, tok, {str(tmp_path / "edited")!r})
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", setup], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = _measure(tmp_path / "base", tmp_path / "edited", tmp_path / "out")
    model, matrix = _folder_bytes(tmp_path / "base"), 49152 * 576 * 4  # the largest matrix: the embedding
    used = got["peak"] - got["start"]
    print(f"SmolLM2 pair: peak RSS above the start {used / 2**20:.1f} MiB, model {model / 2**20:.0f} MiB")
    assert got["restrained"] == 5
    assert used < model + 3 * matrix
