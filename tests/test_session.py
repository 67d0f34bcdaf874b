"""The editing session: factored bookkeeping, schedules, diagnostics, atomic saves, kill and resume."""

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
from tiny_models import tiny_model

from prune_ext import reference
from prune_ext.editing import EditRequest
from prune_ext.session import HELD_EDITED, HELD_RESTRAINED, EditingSession, MatrixLedger, weight_digest
from prune_ext.updates import LowRankUpdate

HERE = Path(__file__).resolve().parent
HPARAMS = {"mom2_n_samples": 5_000, "stats_seq_len": 32, "v_weight_decay": 1e-3, "v_num_grad_steps": 8}
SUBJECTS = ["Alice Smith", "Bob Jones", "Carol White", "Dan Brown", "Eve Black", "Frank Green", "Grace Hall",
            "Henry King"]
TARGETS = ["Paris", "Tokyo", "Berlin", "Madrid", "Rome", "London", "Vienna", "Oslo"]
REQUESTS = [EditRequest(f"The home town of {s}", s, t) for s, t in zip(SUBJECTS, TARGETS)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stats")


def test_ledger_factored_restraint_matches_dense_reference():
    g = torch.Generator().manual_seed(0)
    W = matrix_with_spectrum(300, 200, torch.linspace(5, 1, 200, dtype=torch.float64))
    ledger = MatrixLedger("w", W)
    assert ledger.sigma_w == pytest.approx(5.0, rel=1e-6)
    basis = torch.randn(300, 10, generator=g)  # 30 rank-2 edits inside a 10-dimensional subspace
    for _ in range(30):
        ledger.append(LowRankUpdate("w", basis @ torch.randn(10, 2, generator=g), torch.randn(200, 2, generator=g)),
                      max_rank=16)
    assert ledger.dense is None and ledger.left.shape[1] <= 16 + 2  # recompressed, still factored
    dense = ledger.delta()
    k, (left, right) = ledger.restrained("log", 1.5, 2.0)
    ref = reference.restrain(dense, ledger.sigma_w, 1.5)
    assert ((left @ right.T).double() - ref).norm() / ref.norm() < 1e-5
    assert k == int((torch.linalg.svdvals(dense.double()) > ledger.sigma_w).sum()) > 0
    # a dense update switches the ledger to dense and keeps the same ΔW
    extra = torch.randn(300, 200, generator=g) * 0.01
    ledger.append(extra, max_rank=16)
    assert ledger.dense is not None
    torch.testing.assert_close(ledger.delta(), dense + extra)


def test_a_restraint_with_nothing_above_the_threshold_leaves_the_factors_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    W = matrix_with_spectrum(120, 80, torch.linspace(5, 1, 80, dtype=torch.float64))
    ledger = MatrixLedger("w", W)
    for _ in range(4):  # small updates: every singular value of ΔW stays below σmax(W) = 5
        ledger.append(LowRankUpdate("w", 0.02 * torch.randn(120, 2, generator=g), torch.randn(80, 2, generator=g)),
                      max_rank=16)
    assert float(torch.linalg.svdvals(ledger.delta().double())[0]) < ledger.sigma_w
    k, view = ledger.restrained("log", 1.2, 2.0)
    assert k == 0 and view[0] is ledger.left and view[1] is ledger.right
    assert torch.equal(ledger.weight(view), ledger.weight())  # W + F(ΔW) is W + ΔW to the bit


def run_session(tok, cache, *, arch="gpt2", dtype=torch.float32, **kw):
    model = tiny_model(arch, tok, dtype=dtype)
    session = EditingSession(model, tok, "rome", HPARAMS, cov_cache_dir=cache, progress=False, **kw)
    return model, session


@pytest.mark.parametrize("every", [1, 3, 4])
def test_every_k_edits_restrains_the_cumulative_update(tok, cache, every):
    model, session = run_session(tok, cache, every=every, alpha=1.2)
    name = session.editor.hparams.module_name
    delta = torch.zeros_like(model.get_submodule(name).weight, dtype=torch.float64)
    for i, req in enumerate(REQUESTS[:6]):
        delta = delta + sum(u.dense().double() for u in session.edit(req))
        ledger = session.ledgers[name]
        if (i + 1) % every == 0:  # later edits add to the restrained ΔW, as in the paper
            delta = reference.restrain(delta, ledger.sigma_w, 1.2)
        assert (ledger.delta().double() - delta).norm() / delta.norm() < 1e-5
        # the model always holds W + ΔW
        weight = model.get_submodule(name).weight.detach()
        torch.testing.assert_close(weight, ledger.weight(), rtol=1e-5, atol=1e-6)
    assert len(session.restraints) == 6 // every
    assert any(sum(r["restrained"].values()) > 0 for r in session.restraints), "edits too small to test"
    # the last step was a restraint: finishing must not restrain again; otherwise it restrains the rest
    before = ledger.delta().clone()
    session.finish()
    assert len(session.restraints) == 6 // every + (6 % every != 0)
    if 6 % every == 0:
        assert torch.equal(ledger.delta(), before)
    else:
        delta = reference.restrain(delta, ledger.sigma_w, 1.2)
        assert (ledger.delta().double() - delta).norm() / delta.norm() < 1e-5


def test_once_at_the_end_yields_both_models(tok, cache):
    model, session = run_session(tok, cache)  # the paper's main schedule
    name = session.editor.hparams.module_name
    original = model.get_submodule(name).weight.detach().clone()
    updates = []
    for req in REQUESTS[:5]:
        updates += session.edit(req)
    assert session.restraints == []
    unrestrained = session.weights(restrained=False)[name]
    torch.testing.assert_close(unrestrained, original + sum(u.dense() for u in updates), rtol=1e-5, atol=1e-6)
    restrained = session.weights(restrained=True)[name]
    session.finish()
    ref = original.double() + reference.restrain(unrestrained - original, session.ledgers[name].sigma_w, 1.2)
    assert (model.get_submodule(name).weight.double() - ref).norm() / ref.norm() < 1e-5
    torch.testing.assert_close(model.get_submodule(name).weight.detach(), restrained)


def test_diagnostics_are_exact(tok, cache):
    model, session = run_session(tok, cache, every=2)
    for req in REQUESTS[:4]:
        session.edit(req)
    (name, d), = session.diagnostics().items()
    ledger = session.ledgers[name]
    held = model.get_submodule(name).weight.detach()
    s = torch.linalg.svdvals(held.double())
    assert d.exact and d.held == HELD_EDITED and d.dtype == "float32"
    assert d.sigma_max == pytest.approx(s[0].item(), rel=1e-9)
    assert d.sigma_min == pytest.approx(s[-1].item(), rel=1e-9)
    assert d.condition_number == pytest.approx((s[0] / s[-1]).item(), rel=1e-9)
    assert d.delta_rank == 4 and d.threshold == ledger.sigma_w
    delta = held.double() - ledger.original.double()
    assert d.delta_fro == pytest.approx(delta.norm().item(), rel=1e-9)
    assert d.sha256 == weight_digest(held)
    # the restrained view: diagnostics then describe W + F(ΔW), the matrix the model holds
    # (on a tiny random model σ_W ln α < 1, where the paper's log F raises σ instead of shrinking it)
    session.hold(restrained=True)
    (_, r), = session.diagnostics().items()
    restrained = ledger.original.double() + reference.restrain(ledger.delta(), ledger.sigma_w, 1.2)
    assert r.held == HELD_RESTRAINED
    assert r.sigma_max == pytest.approx(torch.linalg.svdvals(restrained)[0].item(), rel=1e-5)
    assert r.sigma_max == pytest.approx(
        torch.linalg.svdvals(model.get_submodule(name).weight.double())[0].item(), rel=1e-12)
    session.hold(restrained=False)
    assert torch.equal(model.get_submodule(name).weight, held)


def test_bfloat16_model_keeps_float32_books(tok, cache):
    model, session = run_session(tok, cache, arch="llama", dtype=torch.bfloat16, every=1)
    for req in REQUESTS[:3]:
        session.edit(req)
    (name, ledger), = session.ledgers.items()
    assert ledger.left.dtype == torch.float32 and ledger.original.dtype == torch.bfloat16
    weight = model.get_submodule(name).weight
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight.float(), ledger.weight(), rtol=1e-2, atol=1e-2)


def test_bad_arguments(tok):
    model = tiny_model("gpt2", tok)
    with pytest.raises(ValueError, match="restrain"):
        EditingSession(model, tok, "rome", restrain="cubic")
    with pytest.raises(ValueError, match="every"):
        EditingSession(model, tok, "rome", every=0)
    with pytest.raises(ValueError, match="alpha"):
        EditingSession(model, tok, "rome", alpha=1.0)


def test_save_is_atomic_and_resumes(tok, cache, tmp_path):
    ckpt = tmp_path / "session.safetensors"
    model, session = run_session(tok, cache, every=2, checkpoint=ckpt, save_every=2)
    session.run(REQUESTS[:4])
    assert ckpt.exists() and not list(tmp_path.glob(".*.tmp"))
    model2, resumed = run_session(tok, cache, every=2, checkpoint=ckpt)
    assert resumed.edits_done == 4 and resumed.finished
    for name in session.ledgers:
        assert torch.equal(model.get_submodule(name).weight, model2.get_submodule(name).weight)
    with pytest.raises(ValueError, match="every"):
        run_session(tok, cache, every=3, checkpoint=ckpt)


WORKER = """
import os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_session import HPARAMS, REQUESTS
from tiny_models import gpt2_tokenizer, tiny_model
from prune_ext.session import EditingSession
tok = gpt2_tokenizer()
model = tiny_model("gpt2", tok)
session = EditingSession(model, tok, "rome", HPARAMS, every=2, checkpoint={ckpt!r}, save_every=2,
                         cov_cache_dir={cache!r}, progress=False)
def die(s):
    if s.edits_done == 5:
        os.kill(os.getpid(), 9)  # killed midway, between two saves
session.run(REQUESTS, on_step=die)
"""


def test_killed_run_resumes_to_the_same_weights(tok, cache, tmp_path):
    ckpt = tmp_path / "run.safetensors"
    code = textwrap.dedent(WORKER.format(tests=str(HERE), ckpt=str(ckpt), cache=str(cache)))
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    model, resumed = run_session(tok, cache, every=2, checkpoint=ckpt, save_every=2)
    assert resumed.edits_done == 4  # the last save before the kill
    resumed.run(REQUESTS)
    ref_model, ref = run_session(tok, cache, every=2)
    ref.run(REQUESTS)
    for name in ref.ledgers:
        assert torch.equal(model.get_submodule(name).weight, ref_model.get_submodule(name).weight)


class _BatchEditor:
    """A stand-in batch editor (like MEMIT): one rank-len(batch) update of a linear layer per step."""

    name = "batch"
    batched = True

    def __init__(self, model: torch.nn.Linear) -> None:
        self.model, self.g = model, torch.Generator().manual_seed(0)

    def edited_modules(self):
        return ["0"]

    def compute(self, batch):
        r = len(batch)
        return [LowRankUpdate("0", 3 * torch.randn(20, r, generator=self.g), torch.randn(30, r, generator=self.g))]


@pytest.mark.parametrize(("n", "batch", "every", "expected"), [
    (100, 10, 25, [30, 50, 80, 100]),  # a batch that crosses a multiple of k is followed by a restraint
    (30, 4, 8, [8, 16, 24, 30]),  # the last 6 edits come after the last scheduled one: finish() restrains
    (15, 3, 1, [3, 6, 9, 12, 15]),
])
def test_every_counts_edits_not_batches(n, batch, every, expected):
    model = torch.nn.Sequential(torch.nn.Linear(30, 20))
    session = EditingSession(model, None, _BatchEditor(model), restrain="log", every=every, progress=False)
    session.run(list(range(n)), batch_size=batch)
    assert [r["edits"] for r in session.restraints] == expected
    assert sum(r["restrained"]["0"] for r in session.restraints) > 0, "updates too small to test"


@pytest.mark.parametrize("kw", [
    {"restrain": "log", "threshold_scale": 0.5},
    {"restrain": "none", "protect_energy": 0.6, "protect_damp": 1.0},
    {"restrain": "linear", "beta": 3.0, "protect_energy": 0.3, "protect_damp": 0.5, "threshold_scale": 2.0},
])
def test_every_k_with_a_spectral_variant_restrains_the_books_like_the_reference(kw, tmp_path):
    """The variant options reach the scheduled restraint: after each one the books hold the float64
    reference of test_spectral applied to the books before it (W of the stand-in editor's layer)."""
    from test_spectral import _reference

    from prune_ext.spectral import Restraint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 20))
    W = model[0].weight.detach().clone()
    session = EditingSession(model, None, _BatchEditor(model), every=4, progress=False, **kw)
    spec = Restraint(kw["restrain"], kw.get("alpha", 1.2), kw.get("beta", 2.0), kw.get("threshold_scale", 1.0),
                     kw.get("protect_energy"), kw.get("protect_damp", 1.0))
    assert session.schedule.kind == "every"
    session.run(list(range(12)), batch_size=2, finish=False)  # restrained at 4, 8 and 12 edits
    assert [r["edits"] for r in session.restraints] == [4, 8, 12]
    session.edit([12, 13])
    # the restraint of the current books equals the reference
    books = session.ledgers["0"].delta().double()
    session.restrain_now()
    want = _reference(books, W, spec)
    got = session.ledgers["0"].delta().double()
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    torch.testing.assert_close(model[0].weight.detach().double(), W.double() + got, rtol=0, atol=1e-5)
    # a checkpoint remembers the variant: another one refuses it
    session.save(tmp_path / "s.safetensors")
    other = {**kw, "protect_energy": 0.9 if kw.get("protect_energy") is None else None}
    with pytest.raises(ValueError, match="protect_energy"):
        EditingSession(torch.nn.Sequential(torch.nn.Linear(30, 20)), None, _BatchEditor(model), every=4,
                       progress=False, checkpoint=tmp_path / "s.safetensors", **other)


def test_protection_alone_is_a_schedule_and_bad_variants_fail_early():
    model = torch.nn.Sequential(torch.nn.Linear(30, 20))
    s = EditingSession(model, None, _BatchEditor(model), restrain="none", protect_energy=0.5, progress=False)
    assert s.schedule.kind == "once" and "protection" in str(s.schedule)
    assert EditingSession(model, None, _BatchEditor(model), restrain="none", progress=False).schedule.kind == "none"
    for bad in ({"threshold_scale": 0.0}, {"protect_energy": 1.5}, {"protect_damp": -0.1}):
        with pytest.raises(ValueError):
            EditingSession(model, None, _BatchEditor(model), progress=False, **bad)


def _logits(model, tok) -> torch.Tensor:
    ids = tok(["The home town of Alice Smith is", "Bob Jones lives in"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_pretrained_and_save_adapter_load_back(tok, cache, tmp_path, arch):
    """save_pretrained: a Hugging Face folder of exactly the weights the session holds; save_adapter: a PEFT
    LoRA adapter of the held update that, on the unedited model, computes the session's model."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from prune_ext.export import EXPORT_INFO, ExportError

    tok.pad_token = tok.pad_token or tok.eos_token
    model, session = run_session(tok, cache, arch=arch, alpha=1.05)
    with pytest.raises(ExportError, match="no edit to export"):
        session.save_adapter(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    for req in REQUESTS[:4]:
        session.edit(req)
    session.finish()  # the model holds W + F(ΔW)
    name = session.editor.hparams.module_name
    assert session.restraints[-1]["restrained"][name] > 0  # the restraint changed something
    want = _logits(model, tok)

    session.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(_logits(loaded, tok), want, rtol=0, atol=0)
    info = json.loads((tmp_path / "hf" / EXPORT_INFO).read_text())
    assert info["held"] == HELD_RESTRAINED and info["edits"] == 4 and info["restrain"] == "log"

    session.save_adapter(tmp_path / "lora")
    base = tiny_model(arch, tok)  # the same seed: the unedited weights
    plain = _logits(base, tok)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "lora")
    got = _logits(adapted, tok)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * scale  # float32 rounding of the factors
    assert (plain - want).abs().max().item() > 1e-3 * scale  # the edits matter, so the test can fail
    held_delta = (model.get_submodule(name).weight.double() - session.ledgers[name].original.double())
    merged = adapted.merge_and_unload().get_submodule(name).weight.double() - base_weight(arch, tok, name)
    assert (merged - held_delta).norm() <= 1e-5 * held_delta.norm()

    # rank=1: the best rank-one approximation of the held update (an SVD truncation), in PEFT's layout
    session.save_adapter(tmp_path / "lora1", rank=1)
    config = json.loads((tmp_path / "lora1" / "adapter_config.json").read_text())
    assert config["r"] == 1 and json.loads((tmp_path / "lora1" / EXPORT_INFO).read_text())["max_rank"] == 1
    one = peft.PeftModel.from_pretrained(tiny_model(arch, tok), tmp_path / "lora1").merge_and_unload()
    got1 = one.get_submodule(name).weight.double() - base_weight(arch, tok, name)
    U, S, Vh = torch.linalg.svd(held_delta)
    best = S[0] * torch.outer(U[:, 0], Vh[0])
    assert (got1 - best).norm() <= 1e-5 * best.norm()
    with pytest.raises(ExportError, match="already exists"):
        session.save_adapter(tmp_path / "lora")
    with pytest.raises(ValueError, match="rank must be at least 1"):
        session.save_adapter(tmp_path / "lora0", rank=0)


def base_weight(arch: str, tok, name: str) -> torch.Tensor:
    return tiny_model(arch, tok).get_submodule(name).weight.detach().double()
