"""General-ability evaluation with the PRUNE paper's prompts (verbatim) and metrics.

=========== ============================================================= ==========================
task        prompt                                                        score (in [0, 1])
=========== ============================================================= ==========================
gsm8k       ``Q: {QUESTION} A: Let's think step by step. {HINT}            solve rate: first number
            Therefore, the answer (arabic numerals) is:``                  of the answer == gold
rte         ``{SENTENCE1} entails the {SENTENCE2}. True or False?          two-way accuracy
            answer:``
nq          ``Refer to the passage below and answer the following          exact match after
            question. Passage: {DOCUMENT} Question: {QUESTION}``           normalisation
samsum      ``{DIALOGUE} TL;DR:``                                          mean of ROUGE-1/2/L F1
perplexity  held-out text: RTE premises (``sentence1``)                    perplexity (lower is
                                                                           better; not in [0, 1])
=========== ============================================================= ==========================

Choices made where the paper leaves room:

* GSM8K is two-stage zero-shot chain of thought (Kojima et al., 2022), which is what ``{HINT}``
  stands for: the model first continues ``Q: {QUESTION} A: Let's think step by step.`` for up to
  ``max_new_tokens["gsm8k_cot"]`` tokens (stopping at a new ``Q:``); that text is the HINT of the
  full prompt, which is then continued for ``max_new_tokens["gsm8k"]`` tokens and the first
  number in that answer is compared with the gold number (after ``#### ``). Set
  ``gsm8k_cot`` to 0 for a cheap single-stage variant with an empty HINT.
* RTE is scored, not generated: the prediction is "True" when
  ``log P(" True" | prompt) > log P(" False" | prompt)``. This is the two-way decision the
  prompt asks for, without parsing free text, and costs one forward pass per example.
  ``entailment`` is True, ``not_entailment`` False.
* NQ: greedy continuation of the prompt, first non-empty line, a leading ``Answer:`` removed;
  exact match (lower-case, punctuation and articles removed, whitespace collapsed) against any
  accepted answer. The passage is the record's ``output[0]``. The outputs also record a lenient
  ``contains`` flag (answer inside the prediction); the score is exact match.
* SAMSum: first non-empty line of the greedy continuation; ROUGE with Porter stemming
  (``rouge-score``); the per-example mean of the three F1 scores, averaged over examples.
* Greedy decoding on a CPU is bound by reading the weights once per step, so a step costs about
  the same for 1 or 16 rows: prefer large ``batch_size`` (rows are sorted by length first).
* Prompts are raw text (no chat template), as in the paper; ``chat=True`` wraps them in the
  tokenizer's chat template (instruction-tuned models such as SmolLM2-Instruct answer NQ only
  then; with the raw prompt it writes "A:" and stops). Inputs longer than
  ``max_input_tokens`` keep their last tokens.
* ``limit`` examples are drawn with a seeded shuffle, so a smaller limit is a prefix of a larger
  one with the same seed.

Data files are read from ``data_dir`` (argument), else the ``PRUNE_EXT_DATA`` environment
variable, else ``<repo>/../shared/data``; each file is looked up in ``<dir>/tasks/`` and then
``<dir>/``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .generation import generate_greedy, pad_token_id, score_continuations

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_TASKS",
    "ENV_VAR",
    "PROMPTS",
    "TASKS",
    "TaskResult",
    "contains_answer",
    "default_data_dir",
    "evaluate_task",
    "evaluate_tasks",
    "exact_match",
    "extract_number",
    "gsm8k_gold",
    "gsm8k_prompt",
    "load_task",
    "normalize_answer",
    "nq_prompt",
    "numbers_match",
    "perplexity",
    "resolve_data_dir",
    "rouge_mean",
    "rte_label",
    "rte_prompt",
    "samsum_prompt",
    "task_file",
]

ENV_VAR = "PRUNE_EXT_DATA"
TASKS = ("gsm8k", "rte", "nq", "samsum", "perplexity")
DEFAULT_TASKS = ("gsm8k", "rte", "nq", "samsum")
TASK_FILES = {
    "gsm8k": "gsm8k-test.jsonl",
    "rte": "rte.tsv",
    "nq": "nq-open.jsonl",
    "samsum": "samsum-test.json",
    "perplexity": "rte.tsv",
}

# The paper's prompts, verbatim (../shared/data/README.md).
PROMPTS = {
    "gsm8k": "Q: {QUESTION} A: Let's think step by step. {HINT} Therefore, the answer (arabic numerals) is:",
    "rte": "{SENTENCE1} entails the {SENTENCE2}. True or False? answer:",
    "nq": "Refer to the passage below and answer the following question. Passage: {DOCUMENT} Question: {QUESTION}",
    "samsum": "{DIALOGUE} TL;DR:",
}

DEFAULT_MAX_NEW_TOKENS = {"gsm8k_cot": 64, "gsm8k": 16, "nq": 24, "samsum": 48}


# --- prompts ------------------------------------------------------------------------------------


def gsm8k_prompt(question: str, hint: str = "") -> str:
    """The reasoning prompt; with an empty hint the doubled space is collapsed."""
    hint = hint.strip()
    template = PROMPTS["gsm8k"] if hint else PROMPTS["gsm8k"].replace(" {HINT}", "")
    return template.replace("{QUESTION}", question.strip()).replace("{HINT}", hint)


def gsm8k_cot_prompt(question: str) -> str:
    """First stage of zero-shot CoT: the part of the prompt before ``{HINT}``."""
    return PROMPTS["gsm8k"].split(" {HINT}")[0].replace("{QUESTION}", question.strip())


def rte_prompt(sentence1: str, sentence2: str) -> str:
    return PROMPTS["rte"].replace("{SENTENCE1}", sentence1.strip()).replace("{SENTENCE2}", sentence2.strip())


def nq_prompt(passage: str, question: str) -> str:
    return PROMPTS["nq"].replace("{DOCUMENT}", passage.strip()).replace("{QUESTION}", question.strip())


def samsum_prompt(dialogue: str) -> str:
    return PROMPTS["samsum"].replace("{DIALOGUE}", dialogue.replace("\r\n", "\n").strip())


# --- metrics ------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD/NQ normalisation: lower-case, drop punctuation, drop articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised accepted answer."""
    if isinstance(answers, str):
        answers = [answers]
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def contains_answer(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when a normalised accepted answer occurs (on word boundaries) in the normalised prediction.

    A lenient companion of :func:`exact_match`, recorded per example for inspection only.
    """
    if isinstance(answers, str):
        answers = [answers]
    pred = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(a) and f" {normalize_answer(a)} " in pred for a in answers))


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_number(text: str, which: str = "first") -> str | None:
    """The first (or last) number in ``text`` as a canonical string, or None.

    Thousands separators are removed (``1,234`` → ``1234``), a trailing ``.`` is not part of the
    number, and integral values lose their decimals (``18.00`` → ``18``).
    """
    if which not in ("first", "last"):
        raise ValueError(f"which must be 'first' or 'last', got {which!r}")
    cleaned = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    found = _NUMBER.findall(cleaned)
    if not found:
        return None
    return _canonical(found[0] if which == "first" else found[-1])


def _canonical(number: str) -> str:
    value = float(number)
    if value.is_integer():
        return str(int(value))
    return repr(value)


def gsm8k_gold(answer: str) -> str:
    """The gold number of a GSM8K answer: what follows ``#### ``, canonicalised."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer without '####': {answer[-60:]!r}")
    gold = answer.split("####")[-1].strip().replace(",", "")
    num = extract_number(gold)
    if num is None:
        raise ValueError(f"GSM8K answer without a number after '####': {gold!r}")
    return num


def numbers_match(prediction: str | None, gold: str) -> bool:
    if prediction is None:
        return False
    return math.isclose(float(prediction), float(gold), rel_tol=0.0, abs_tol=1e-6)


def rte_label(label: str) -> bool:
    """``entailment`` → True, ``not_entailment`` → False (also accepts 0/1 and True/False)."""
    key = str(label).strip().lower()
    if key in ("entailment", "true", "0"):
        return True
    if key in ("not_entailment", "false", "1"):
        return False
    raise ValueError(f"unknown RTE label {label!r}")


_SCORER = None


def rouge_mean(prediction: str, reference: str) -> float:
    """Mean of the ROUGE-1, ROUGE-2 and ROUGE-L F1 scores (Porter stemming)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = _SCORER.score(reference, prediction)
    return (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3.0


_ANSWER_PREFIX = r"(answer|a)\s*:"


def _strip_answer_prefix(text: str) -> str:
    return re.sub(r"^\s*" + _ANSWER_PREFIX + r"\s*", "", text.strip(), flags=re.IGNORECASE).strip()


# --- data ---------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """``<repo>/../shared/data`` (the checkout's sibling ``shared/data`` folder)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$PRUNE_EXT_DATA``, else :func:`default_data_dir`."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else default_data_dir()


def _check_task(name: str) -> None:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")


def task_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of a task's data file; FileNotFoundError (naming the path and the env var) if absent."""
    _check_task(name)
    base = resolve_data_dir(data_dir)
    candidates = [base / "tasks" / TASK_FILES[name], base / TASK_FILES[name]]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"data for task {name!r} not found: {candidates[0]} (nor {candidates[1]}); "
        f"pass data_dir= or set {ENV_VAR} to the folder holding tasks/{TASK_FILES[name]}"
    )


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: malformed JSON ({e.msg})") from None
    return records


def _require(path: Path, n: int, record, keys: Sequence[str]) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"{path}: record {n} is not an object")  # noqa: TRY004 (malformed data)
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{path}: record {n} lacks {', '.join(missing)}")


def _load_all(name: str, path: Path) -> list[dict]:
    if name == "gsm8k":
        out = []
        for n, r in enumerate(_read_jsonl(path), 1):
            _require(path, n, r, ("question", "answer"))
            try:
                gold = gsm8k_gold(r["answer"])
            except ValueError as e:
                raise ValueError(f"{path}: record {n}: {e}") from None
            out.append({"question": r["question"], "gold": gold, "rationale": r["answer"]})
        return out
    if name in ("rte", "perplexity"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        out = []
        for n, r in enumerate(rows, 1):
            _require(path, n, r, ("sentence1", "sentence2", "label"))
            try:
                label = rte_label(r["label"])
            except ValueError as e:
                raise ValueError(f"{path}: row {n}: {e}") from None
            out.append({"sentence1": r["sentence1"], "sentence2": r["sentence2"], "label": label})
        if name == "perplexity":
            seen: dict[str, None] = {}
            for r in out:
                seen.setdefault(r["sentence1"].strip(), None)
            out = [{"text": t} for t in seen if t]
        return out
    if name == "nq":
        out = []
        for n, r in enumerate(_read_jsonl(path), 1):
            _require(path, n, r, ("question", "answer", "output"))
            answers = [r["answer"]] if isinstance(r["answer"], str) else list(r["answer"])
            passages = [r["output"]] if isinstance(r["output"], str) else list(r["output"])
            if not answers or not passages:
                raise ValueError(f"{path}: record {n} has no answer or no passage")
            out.append({"question": r["question"], "answers": answers, "passage": passages[0].strip()})
        return out
    if name == "samsum":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list")
        for n, r in enumerate(data, 1):
            _require(path, n, r, ("dialogue", "summary"))
        return [{"id": r.get("id"), "dialogue": r["dialogue"], "summary": r["summary"]} for r in data]
    raise AssertionError(name)


def load_task(
    name: str,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Records of a task, ``limit`` of them drawn by a seeded shuffle (all, shuffled, if None).

    Fields: gsm8k ``question, gold, rationale``; rte ``sentence1, sentence2, label`` (bool);
    nq ``question, answers, passage``; samsum ``id, dialogue, summary``; perplexity ``text``.
    """
    _check_task(name)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    records = _load_all(name, task_file(name, data_dir))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    return [records[i] for i in order]


# --- evaluation ---------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """Score of one task, with the per-example outputs for inspection."""

    name: str
    score: float
    n: int
    seconds: float
    outputs: list[dict] = field(default_factory=list)


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = False,
) -> float:
    """Token-weighted perplexity of ``texts`` (each truncated to ``max_length`` tokens)."""
    encoded = [tokenizer(t).input_ids[:max_length] for t in texts]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    if not encoded:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    pad = pad_token_id(tokenizer)
    items = [(ids[:1], ids[1:]) for ids in encoded]
    scores = score_continuations(
        model, items, pad_id=pad, batch_size=batch_size, progress=progress, desc="perplexity"
    )
    total = sum(s.sum_logprob for s in scores)
    count = sum(len(s.target) for s in scores)
    return math.exp(-total / count)


def _max_new(overrides: Mapping[str, int] | None) -> dict[str, int]:
    out = dict(DEFAULT_MAX_NEW_TOKENS)
    for k, v in (overrides or {}).items():
        if k not in out:
            raise ValueError(f"unknown max_new_tokens key {k!r}; expected one of {', '.join(out)}")
        out[k] = int(v)
    return out


def evaluate_task(
    model: torch.nn.Module,
    tokenizer,
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = 50,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    max_new_tokens: Mapping[str, int] | None = None,
    max_input_tokens: int = 1024,
    chat: bool = False,
) -> TaskResult:
    """Run one task (see the module docstring) and return its score, size, time and outputs.

    ``chat=True`` wraps each prompt (the paper's prompt, unchanged) as a user turn of the
    tokenizer's chat template, for instruction-tuned models that do not answer raw prompts; the
    default is the paper's raw prompt. Perplexity never uses the template.
    """
    _check_task(name)
    limits = _max_new(max_new_tokens)
    if chat and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat=True but the tokenizer has no chat template")

    def wrap(prompt: str) -> str:
        if not chat:
            return prompt
        msgs = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    records = load_task(name, data_dir=data_dir, limit=limit, seed=seed)
    start = time.perf_counter()
    gen = {"batch_size": batch_size, "max_input_tokens": max_input_tokens, "progress": progress}
    outputs: list[dict] = []
    if name == "gsm8k":
        questions = [r["question"] for r in records]
        hints = [""] * len(records)
        if limits["gsm8k_cot"] > 0:
            hints = generate_greedy(
                model,
                tokenizer,
                [wrap(gsm8k_cot_prompt(q)) for q in questions],
                max_new_tokens=limits["gsm8k_cot"],
                stop=("Q:",),
                desc="gsm8k (reasoning)",
                **gen,
            )
        answers = generate_greedy(
            model,
            tokenizer,
            [wrap(gsm8k_prompt(q, h)) for q, h in zip(questions, hints)],
            max_new_tokens=limits["gsm8k"],
            stop=("\n",),
            desc="gsm8k (answer)",
            **gen,
        )
        for r, h, a in zip(records, hints, answers):
            pred = extract_number(a)
            outputs.append(
                {
                    "hint": h,
                    "output": a,
                    "prediction": pred,
                    "gold": r["gold"],
                    "correct": numbers_match(pred, r["gold"]),
                }
            )
        score = sum(o["correct"] for o in outputs) / len(outputs)
    elif name == "rte":
        pad = pad_token_id(tokenizer)
        yes = tokenizer(" True", add_special_tokens=False).input_ids
        no = tokenizer(" False", add_special_tokens=False).input_ids
        items = []
        for r in records:
            ctx = tokenizer(wrap(rte_prompt(r["sentence1"], r["sentence2"]))).input_ids[-max_input_tokens:]
            items += [(ctx, yes), (ctx, no)]
        scores = score_continuations(
            model, items, pad_id=pad, batch_size=2 * batch_size, progress=progress, desc="rte"
        )
        for i, r in enumerate(records):
            pred = scores[2 * i].sum_logprob > scores[2 * i + 1].sum_logprob
            outputs.append({"prediction": pred, "label": r["label"], "correct": pred == r["label"]})
        score = sum(o["correct"] for o in outputs) / len(outputs)
    elif name == "nq":
        texts = generate_greedy(
            model,
            tokenizer,
            [wrap(nq_prompt(r["passage"], r["question"])) for r in records],
            max_new_tokens=limits["nq"],
            stop=("\n",),
            skip_prefix=_ANSWER_PREFIX,
            desc="nq",
            **gen,
        )
        for r, t in zip(records, texts):
            pred = _strip_answer_prefix(t)
            outputs.append(
                {
                    "output": t,
                    "prediction": pred,
                    "answers": r["answers"],
                    "em": exact_match(pred, r["answers"]),
                    "contains": contains_answer(pred, r["answers"]),
                }
            )
        score = sum(o["em"] for o in outputs) / len(outputs)
    elif name == "samsum":
        texts = generate_greedy(
            model,
            tokenizer,
            [wrap(samsum_prompt(r["dialogue"])) for r in records],
            max_new_tokens=limits["samsum"],
            stop=("\n",),
            desc="samsum",
            **gen,
        )
        for r, t in zip(records, texts):
            outputs.append(
                {
                    "prediction": t.strip(),
                    "summary": r["summary"],
                    "rouge": rouge_mean(t.strip(), r["summary"]),
                }
            )
        score = sum(o["rouge"] for o in outputs) / len(outputs)
    else:  # perplexity
        score = perplexity(
            model,
            tokenizer,
            [r["text"] for r in records],
            batch_size=batch_size,
            max_length=max_input_tokens,
            progress=progress,
        )
    return TaskResult(
        name=name, score=float(score), n=len(records), seconds=time.perf_counter() - start, outputs=outputs
    )


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = 50,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    max_new_tokens: Mapping[str, int] | None = None,
    max_input_tokens: int = 1024,
    chat: bool = False,
) -> dict[str, float]:
    """Score of each task in ``tasks`` (``gsm8k``, ``rte``, ``nq``, ``samsum``, ``perplexity``).

    All names and data files are checked before any model work starts.
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    for name in tasks:
        _check_task(name)
    for name in tasks:
        task_file(name, data_dir)
    _max_new(max_new_tokens)
    results = {}
    for name in tqdm(list(tasks), desc="tasks", disable=not progress or len(tasks) < 2, leave=False):
        results[name] = evaluate_task(
            model,
            tokenizer,
            name,
            data_dir=data_dir,
            limit=limit,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            max_new_tokens=max_new_tokens,
            max_input_tokens=max_input_tokens,
            chat=chat,
        ).score
    return results
