"""MEND: the editor networks, the gradient algebra, the editor contract, training and resume.

Tiny random GPT-2 (Conv1D) and Llama models with the real GPT-2 tokenizer; the ``slow`` test
edits held-out CounterFact records on SmolLM2-135M with the editor that ships with the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch

from prune_ext.editing import EditRequest, apply_edits, apply_update, make_editor
from prune_ext.editing.mend import Mend, MendHyperParams, MendNetConfig, MendNetworks, MendTrainConfig, train_mend
from prune_ext.editing.mend.editor import default_mend_layers, mend_module_templates
from prune_ext.editing.mend.grads import (
    RowBatch,
    edited_shape,
    gradient_factors,
    low_rank_edits,
    make_row,
    mean_nll,
    row_logprobs,
)
from prune_ext.editing.mend.network import IdentityLowRankLayer, RunningNorm
from prune_ext.editing.models import editing_mode, get_module

transformers = pytest.importorskip("transformers")

SUBJECTS = ["Japan", "France", "Danielle Darrieux", "the Eiffel Tower", "Toyota", "Barack Obama", "Apple",
            "Mount Fuji", "the Nile", "Lionel Messi", "Google", "Mozart"]
TARGETS = ["Paris", "Tokyo", "English", "Rome", "Berlin", "London", "Madrid", "Moscow", "Cairo", "Lima", "Oslo",
           "Delhi"]


def make_requests() -> list[EditRequest]:
    """Edit records with a paraphrase and a locality prompt each, as CounterFact has."""
    n = len(SUBJECTS)
    return [
        EditRequest(
            f"The official language of {s}", s, TARGETS[i], target_true=TARGETS[(i + 3) % n],
            paraphrase_prompts=(f"People in {s} speak",),
            neighborhood_prompts=(f"The weather in {TARGETS[(i + 5) % n]} is",), neighborhood_answers=("cold",),
        )
        for i, s in enumerate(SUBJECTS)
    ]


pytestmark = pytest.mark.usefixtures("one_thread")


def edited_names(model: torch.nn.Module) -> list[str]:
    return [t.format(layer) for layer in default_mend_layers(model) for t in mend_module_templates(model)]


def fresh_editor_dir(model: torch.nn.Module, folder: Path, rank: int = 16) -> Path:
    """An untrained (identity) editor for ``model``'s default modules, saved like train-mend does."""
    names = edited_names(model)
    nets = MendNetworks(names, [edited_shape(model, n) for n in names], MendNetConfig(rank=rank))
    nets.save(folder)
    return folder


def target_logprob(model: torch.nn.Module, tok: Any, prompt: str, target: str) -> float:
    batch = RowBatch([make_row(tok, prompt, target)], tok.eos_token_id, "cpu")
    with torch.no_grad():
        return -float(mean_nll(batch, row_logprobs(model, batch))[0])


# ---------------------------------------------------------------------------------------------
# the networks


def test_networks_are_shared_by_shape_with_one_mode_per_matrix(tok):
    model = tiny_models.tiny_model("llama", tok)
    names = edited_names(model)
    assert names[:3] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert len(names) == 9  # gate, up, down of the last three blocks
    nets = MendNetworks(names, [edited_shape(model, n) for n in names], MendNetConfig(rank=16))
    assert sorted(nets.nets) == ["1024x64", "64x1024"]  # (in, out): gate/up share one, down another
    assert [nets.mode_of[n] for n in names if "down" in n] == [0, 1, 2]
    assert [nets.mode_of[n] for n in names if "down" not in n] == [0, 1, 2, 3, 4, 5]
    d, r = 64 + 1024, 16
    per_layer = 2 * d * r + d  # A, B, bias
    expected = 2 * (2 * per_layer) + 2 * 2 * d * (6 + 3) + len(names)  # 2 nets × 2 layers, scale/shift, η
    assert nets.n_parameters() == expected
    gpt2 = tiny_models.tiny_model("gpt2", tok)
    assert edited_names(gpt2) == [f"transformer.h.{i}.mlp.{m}" for i in (1, 2, 3) for m in ("c_fc", "c_proj")]
    assert [edited_shape(gpt2, n) for n in edited_names(gpt2)[:2]] == [(64, 1024), (1024, 64)]


def test_untrained_network_is_the_identity_and_training_mode_collects_statistics():
    nets = MendNetworks(["a", "b"], [(5, 7), (5, 7)], MendNetConfig(rank=3))
    u, d = torch.randn(4, 5), torch.randn(4, 7)
    nets.eval()
    (u_t, d_t), = nets.transform({"a": (u, d)}).values()
    assert torch.equal(u_t, u) and torch.equal(d_t, d)
    nets.train()
    nets.transform({"a": (u, d), "b": (2 * u, 2 * d)})
    norm = nets.nets["5x7"].norm
    assert float(norm.count) == 8


def test_zero_initialised_layer_gets_a_gradient_at_the_start():
    """A = 0 puts every pre-activation at exactly 0: A, the bias and the shifts must still get the
    gradient (MEND's clamp; torch 2.14 changed clamp's gradient at 0 to 0, which froze them)."""
    layer = IdentityLowRankLayer(6, 3, 2, torch.Generator().manual_seed(0))
    z, modes = torch.randn(5, 6), torch.tensor([0, 1, 0, 1, 1])
    out = layer(z, modes)
    torch.testing.assert_close(out, z)
    out.square().sum().backward()
    pre_grad = 2 * out  # d(sum out²)/d pre, with the activation's gradient 1 at 0
    torch.testing.assert_close(layer.bias.grad, pre_grad.sum(0))
    torch.testing.assert_close(layer.up.grad, pre_grad.T @ (z @ layer.down.detach().T))
    assert layer.mode_shift.grad.abs().sum() > 0


def test_running_norm_matches_the_statistics_of_all_rows():
    torch.manual_seed(0)
    x = torch.randn(57, 6, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 4, 5, 1e-3]) + 10
    norm = RunningNorm(6)
    for chunk in (x[:1], x[1:20], x[20:21], x[21:]):
        norm.update(chunk)
    torch.testing.assert_close(norm.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.std, x.std(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm(x), (x - x.mean(0)) / (x.std(0) + 1e-7))


def test_saved_editor_loads_back_exactly(tmp_path):
    nets = MendNetworks(["a", "b", "c"], [(5, 7), (5, 7), (7, 5)], MendNetConfig(rank=4, seed=3))
    with torch.no_grad():
        for p in nets.parameters():
            p.add_(torch.randn_like(p))
    nets.train()
    nets.transform({"a": (torch.randn(6, 5), torch.randn(6, 7))})
    nets.save(tmp_path)
    loaded, meta = MendNetworks.load(tmp_path)
    assert meta["modules"] == ["a", "b", "c"] and meta["config"]["rank"] == 4
    for (k, v), (k2, v2) in zip(nets.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


# ---------------------------------------------------------------------------------------------
# the algebra


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_identity_init_gives_minus_eta_times_the_autograd_gradient(arch, tok, tmp_path):
    """The defining algebra, float64: an untrained editor's update is −η ∇W L, L the edit loss."""
    model = tiny_models.tiny_model(arch, tok, dtype=torch.float64)
    editor = make_editor(model, tok, "mend", {"editor_path": str(fresh_editor_dir(model, tmp_path))})
    req = EditRequest("The capital city of Japan", "Japan", "Paris", target_true="Tokyo")
    updates = editor.compute(req)
    names = edited_names(model)
    weights = [get_module(model, n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    batch = RowBatch([make_row(tok, req.prompt, req.target_new)], tok.eos_token_id, "cpu")
    loss = mean_nll(batch, row_logprobs(model, batch)).mean()
    grads = torch.autograd.grad(loss, weights)
    assert [u.module for u in updates] == names
    for update, grad, name in zip(updates, grads, names):
        eta = float(editor.networks.edit_lrs[names.index(name)])
        assert update.shape == tuple(grad.shape)  # the stored layout (Conv1D: in × out)
        assert float(grad.abs().max()) > 0
        scale = float(grad.abs().max())
        torch.testing.assert_close(update.dense().double(), -eta * grad, rtol=1e-9, atol=1e-12 * scale)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_factors_reproduce_the_update_and_the_weight_change(arch, tok, tmp_path):
    """With trained-like (perturbed) networks and statistics: ΔW = −η Σ_t δ̃_t ũ_tᵀ, its rank is at
    most the edit row's token count, and applying it changes the weight by exactly ΔW."""
    model = tiny_models.tiny_model(arch, tok)
    names = edited_names(model)
    nets = MendNetworks(names, [edited_shape(model, n) for n in names], MendNetConfig(rank=8, seed=1))
    with torch.no_grad():
        for layer in (lay for net in nets.nets.values() for lay in net.layers):
            layer.up.normal_(0, 0.01)
            layer.mode_shift.normal_(0, 0.1)
    req = EditRequest("The capital city of Japan", "Japan", "Paris", target_true="Tokyo")
    row = make_row(tok, req.prompt, req.target_new)
    batch = RowBatch([row], tok.eos_token_id, "cpu")
    with editing_mode(model):
        nets.train()
        nets.transform(gradient_factors(model, names, RowBatch([make_row(tok, "Some other text", "here")] * 2,
                                                                 tok.eos_token_id, "cpu")).factors)
        grads = gradient_factors(model, names, batch)
    nets.save(tmp_path)
    editor = Mend(model, tok, MendHyperParams.for_model(model, editor_path=str(tmp_path)))
    before = {n: get_module(model, n).weight.detach().clone() for n in names}
    updates = editor.compute(req)
    nets.eval()
    with torch.no_grad():
        expected = nets.transform(grads.factors)
    for update, name in zip(updates, names):
        u_t, d_t = expected[name]
        eta = float(nets.edit_lrs.detach()[names.index(name)])
        delta_w = -eta * d_t.T @ u_t  # out × in
        if get_module(model, name).weight.shape != delta_w.shape:
            delta_w = delta_w.T  # Conv1D stores in × out
        torch.testing.assert_close(update.dense(), delta_w, rtol=1e-5, atol=1e-6 * float(delta_w.abs().max()))
        assert update.rank <= len(row.ids)
        apply_update(model, update)
        torch.testing.assert_close(get_module(model, name).weight - before[name], update.dense(),
                                   rtol=1e-5, atol=1e-7)


def test_edited_pass_from_the_first_edited_block_is_exact(tok):
    model = tiny_models.tiny_model("llama", tok)
    names = edited_names(model)
    nets = MendNetworks(names, [edited_shape(model, n) for n in names], MendNetConfig(rank=8))
    rows = [make_row(tok, "The capital city of Japan", "Paris"), make_row(tok, "The weather in Paris today", "cold")]
    batch = RowBatch(rows, tok.eos_token_id, "cpu")
    with editing_mode(model):
        grads = gradient_factors(model, names, batch, 1, blocks=model.model.layers, first_block=1)
        pairs = nets.update_factors(grads.factors)
        with torch.no_grad(), low_rank_edits(model, pairs):
            full = row_logprobs(model, batch)
            started = row_logprobs(model, batch, grads.start)
    torch.testing.assert_close(started, full, rtol=0, atol=1e-6)
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in model.model.layers)  # blocks restored


# ---------------------------------------------------------------------------------------------
# the editor contract


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compute_never_writes_the_model(arch, tok, tmp_path):
    model = tiny_models.tiny_model(arch, tok)
    editor = make_editor(model, tok, "mend", {"editor_path": str(fresh_editor_dir(model, tmp_path))})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    updates = editor.compute([make_requests()[0]])
    assert len(updates) == len(edited_names(model)) and all(float(u.dense().abs().max()) > 0 for u in updates)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_apply_edits_is_sequential_and_each_update_is_what_was_applied(tok, tmp_path):
    model = tiny_models.tiny_model("llama", tok)
    path = str(fresh_editor_dir(model, tmp_path))
    reqs = make_requests()[:2]
    before = {n: get_module(model, n).weight.detach().clone() for n in edited_names(model)}
    updates = apply_edits(model, tok, reqs, editor="mend", hparams={"editor_path": path}, progress=False)
    assert len(updates) == 2 * len(before)
    for name, weight in before.items():
        total = sum(u.dense() for u in updates if u.module == name)
        torch.testing.assert_close(get_module(model, name).weight - weight, total, rtol=1e-5, atol=1e-7)
    # the second edit was computed on the model with the first applied
    fresh = tiny_models.tiny_model("llama", tok)
    second_alone = make_editor(fresh, tok, "mend", {"editor_path": path}).compute(reqs[1])
    assert not torch.allclose(second_alone[0].dense(), updates[len(before)].dense())


def test_missing_editor_says_which_command_to_run(tok, tmp_path):
    model = tiny_models.tiny_model("llama", tok)
    with pytest.raises(FileNotFoundError, match="prune-ext train-mend"):
        make_editor(model, tok, "mend")  # nothing ships for a tiny random model
    with pytest.raises(FileNotFoundError, match="prune-ext train-mend .*--out DIR"):
        make_editor(model, tok, "mend", {"editor_path": str(tmp_path / "nowhere")})
    other = tiny_models.tiny_model("gpt2", tok)
    with pytest.raises(ValueError, match="edits"):
        make_editor(model, tok, "mend", {"editor_path": str(fresh_editor_dir(other, tmp_path / "gpt2"))})


# ---------------------------------------------------------------------------------------------
# training


def tiny_config(out: Path, **changes: Any) -> MendTrainConfig:
    fields: dict[str, Any] = dict(out=str(out), model="tiny", steps=12, val_size=2, edits_per_step=5, rank=16,
                                  lr=3e-4, lr_lr=3e-4, val_every=100, checkpoint_every=100)
    fields.update(changes)
    return MendTrainConfig(**fields)


def test_training_lowers_the_loss_and_the_trained_editor_edits(tok, tmp_path):
    # Five training records and five edits per step: every step sees the same batch, so the curve is
    # one fixed objective under Adam and falls steadily. (With changing batches on a tiny random model
    # the curve is noise-dominated and its shape changed between torch releases; held-out quality is
    # measured on SmolLM2, not here.)
    model = tiny_models.tiny_model("llama", tok)
    reqs = make_requests()[:7]
    result = train_mend(tiny_config(tmp_path), model=model, tokenizer=tok, requests=reqs, progress=False)
    assert result.steps == 12 and len(result.curve) == 12
    first = sum(r["loss"] for r in result.curve[:4]) / 4
    last = sum(r["loss"] for r in result.curve[-4:]) / 4
    assert last < 0.5 * first, [round(r["loss"], 3) for r in result.curve]
    assert [v["step"] for v in result.val_curve] == [0, 12]
    assert (tmp_path / "editor" / "mend.safetensors").is_file() and (tmp_path / "curve.jsonl").is_file()
    # the saved editor, loaded through the editor contract, makes a trained edit
    val = set(__import__("json").loads((tmp_path / "split.json").read_text())["val"])
    record = next(r for i, r in enumerate(reqs) if i not in val)
    before = target_logprob(model, tok, record.prompt, record.target_new)
    for update in make_editor(model, tok, "mend", {"editor_path": str(tmp_path)}).compute(record):
        apply_update(model, update)
    after = target_logprob(model, tok, record.prompt, record.target_new)
    assert after > before + 1.0, (before, after)


def test_resumed_training_continues_from_the_checkpoint_bit_for_bit(tok, tmp_path):
    reqs = make_requests()
    straight = train_mend(tiny_config(tmp_path / "a", steps=4), model=tiny_models.tiny_model("llama", tok),
                          tokenizer=tok, requests=reqs, progress=False)
    model = tiny_models.tiny_model("llama", tok)
    stopped = train_mend(tiny_config(tmp_path / "b", steps=4), model=model, tokenizer=tok, requests=reqs,
                         progress=False, stop_after=2)
    assert stopped.steps == 2 and stopped.editor_dir is None and (tmp_path / "b" / "checkpoint.pt").is_file()
    resumed = train_mend(tiny_config(tmp_path / "b", steps=4), model=model, tokenizer=tok, requests=reqs,
                         progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 4 and len(resumed.curve) == 4
    for (k, v), v2 in zip(straight.networks.state_dict().items(), resumed.networks.state_dict().values()):
        assert torch.equal(v, v2), k
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for group in ("opt", "lr_opt"):
        for s1, s2 in zip(a[group]["state"].values(), b[group]["state"].values()):
            assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert [r["loss"] for r in straight.curve] == [r["loss"] for r in resumed.curve]
    with pytest.raises(ValueError, match="other settings .*seed"):
        train_mend(tiny_config(tmp_path / "b", steps=5, seed=1), model=model, tokenizer=tok, requests=reqs,
                   progress=False)


def test_cli_train_mend_bad_input_is_one_line(tmp_path, capsys):
    from prune_ext.cli import main

    assert main(["train-mend", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prune-ext: error:") and "missing.json" in err and "\n" not in err
    assert main(["train-mend", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_packaged_editor_edits_held_out_counterfact_records(data_dir):
    """The shipped SmolLM2 editor on 10 validation records (never trained on), one edit at a time."""
    import json

    from prune_ext.editing import load_counterfact, load_model
    from prune_ext.editing.mend import PACKAGED_WEIGHTS
    from prune_ext.evaluation import evaluate_edits

    weights = PACKAGED_WEIGHTS / "smollm2-135m"
    if not (weights / "mend.json").is_file():
        pytest.skip("no packaged MEND editor for smollm2-135m")
    meta = json.loads((weights / "mend.json").read_text())
    records = load_counterfact(data_dir / "counterfact" / "counterfact-edit.json")
    model, tok = load_model("smollm2-135m")
    editor = make_editor(model, tok, "mend", progress=False)
    original = {n: get_module(model, n).weight.detach().clone() for n in editor.edited_modules()}
    successes = 0
    for index in meta["validation_records"][:10]:
        req = records[index]
        for u in editor.compute(req):
            apply_update(model, u)
        successes += evaluate_edits(model, tok, [req], "counterfact", progress=False)["efficacy"]
        with torch.no_grad():
            for n, w in original.items():
                get_module(model, n).weight.copy_(w)
    assert successes >= 7, successes
