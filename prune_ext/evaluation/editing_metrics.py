"""Editing metrics of the PRUNE paper: efficacy, generalization and locality, in two styles.

* ``style="counterfact"`` (ROME's efficacy / paraphrase / neighborhood scores): a prompt counts as
  a success when the new target is more likely than the original one,
  ``mean log P(target_new | prompt) > mean log P(target_true | prompt)`` (log-probs averaged over
  the target's tokens, as ROME does). Locality: the neighborhood prompt still prefers its true
  answer (``neighborhood_answers`` if given, else ``target_true``) over ``target_new``.
* ``style="zsre"`` (MEND / ROME / EasyEdit zsRE): teacher-forced token-level argmax accuracy of
  ``target_new`` after the prompt. Locality: with a :func:`locality_baseline` computed on the
  unedited model, the fraction of the neighborhood answer's positions where the edited model's
  argmax equals the unedited model's argmax ("unrelated prompts keep their original answer");
  without a baseline, token accuracy against ``neighborhood_answers``.

Each metric is the mean over edits of the per-edit score (a per-edit score is the mean over that
edit's prompts), evaluated for every request passed, i.e. for all edits so far with the current
model. Ties count as failures. A metric with no prompt at all (say, no paraphrases) is ``nan``.
Every metric comes with its number of edits (``"n"``) and a 95 % interval over edits
(``"intervals"``; :mod:`.intervals`).

``live=True`` adds the live-decoding success rates ``live_efficacy`` / ``live_generalization``
(greedy generation from the prompt; see :func:`evaluate_edits`): teacher-forced
P(new) > P(true) can overstate what the edited model actually says.

Requests can be any object or mapping. Recognised fields (first one present wins):

=====================  =============================================================================
prompt                 ``prompt``, ``src`` (``"{}"`` is replaced by the subject)
subject                ``subject``
target_new             ``target_new``, ``alt`` (a ``{"str": ...}`` mapping is accepted)
target_true            ``target_true``, ``ground_truth``, zsRE's ``answers`` / ``pred`` (optional)
paraphrase_prompts     ``paraphrase_prompts``, ``rephrase_prompts``, ``rephrase_prompt``, ``rephrase``
neighborhood_prompts   ``neighborhood_prompts``, ``locality_prompts``, ``locality_prompt``, ``loc``
neighborhood_answers   ``neighborhood_answers``, ``locality_answers``, ``locality_ground_truth``,
                       ``loc_ans`` (optional; one string is used for every neighborhood prompt)
=====================  =============================================================================

ROME's native CounterFact record (``requested_rewrite`` holding prompt / subject / target_new /
target_true) is accepted too. Targets are scored with a leading space (``" " + target``), the
context and the target being tokenized separately and concatenated, as ROME does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .generation import ContinuationScore, generate_greedy, pad_token_id, score_continuations
from .intervals import mean_interval

__all__ = [
    "STYLES",
    "EditCase",
    "LocalityBaseline",
    "evaluate_edits",
    "live_success",
    "locality_baseline",
    "normalize_request",
]

STYLES = ("counterfact", "zsre")

_FIELDS = {
    "prompt": ("prompt", "src"),
    "subject": ("subject",),
    "target_new": ("target_new", "alt"),
    "target_true": ("target_true", "ground_truth", "answers", "pred"),
    "paraphrase_prompts": ("paraphrase_prompts", "rephrase_prompts", "rephrase_prompt", "rephrase"),
    "neighborhood_prompts": ("neighborhood_prompts", "locality_prompts", "locality_prompt", "loc"),
    "neighborhood_answers": (
        "neighborhood_answers",
        "locality_answers",
        "locality_ground_truth",
        "loc_ans",
    ),
}

_MISSING = object()


def _get(obj, name: str, default=_MISSING):
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _first(obj, key: str):
    for name in _FIELDS[key]:
        value = _get(obj, name)
        if value is not _MISSING and value is not None:
            return value
    return None


def _target_str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("str")
    if isinstance(value, (list, tuple)):  # e.g. zsRE "answers"
        value = value[0] if value else None
    return None if value is None else str(value)


def _str_list(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    out = []
    for v in value:
        if isinstance(v, Mapping):  # ROME's zsRE / MEND layouts: {"prompt": ..., "target": ...}
            v = v.get("prompt")
        if not isinstance(v, str):
            raise ValueError(f"{what} must be strings, got {type(v).__name__}")  # noqa: TRY004 (bad data)
        out.append(v)
    return out


@dataclass(frozen=True)
class EditCase:
    """A request reduced to what the metrics need (prompts already formatted with the subject)."""

    prompt: str
    target_new: str
    target_true: str | None = None
    subject: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_answers: tuple[str, ...] | None = None


def _fill(prompt: str, subject: str | None) -> str:
    if "{}" in prompt:
        if subject is None:
            raise ValueError(f"prompt {prompt!r} has a '{{}}' placeholder but the request has no subject")
        prompt = prompt.replace("{}", subject)
    return prompt


def normalize_request(request) -> EditCase:
    """Read an edit request (object, dict, flattened CounterFact/zsRE record, or ROME record)."""
    if isinstance(request, EditCase):
        return request
    rewrite = _get(request, "requested_rewrite", None)
    source = rewrite if rewrite is not None else request
    prompt = _first(source, "prompt")
    subject = _first(source, "subject")
    target_new = _target_str(_first(source, "target_new"))
    target_true = _target_str(_first(source, "target_true"))
    if prompt is None or target_new is None:
        raise ValueError(f"edit request needs a prompt and a target_new, got {request!r}")
    subject = None if subject is None else str(subject)
    paraphrases = [
        _fill(p, subject) for p in _str_list(_first(request, "paraphrase_prompts"), "paraphrase prompts")
    ]
    neighbors = _str_list(_first(request, "neighborhood_prompts"), "neighborhood prompts")
    raw_answers = _first(request, "neighborhood_answers")
    answers: tuple[str, ...] | None = None
    if raw_answers is not None:
        if isinstance(raw_answers, (str, Mapping)):
            answers = tuple([_target_str(raw_answers)] * len(neighbors))
        else:
            answers = tuple(_target_str(a) for a in raw_answers)
            if len(answers) == 1 and len(neighbors) > 1:
                answers = answers * len(neighbors)
        if len(answers) != len(neighbors):
            raise ValueError(
                f"{len(neighbors)} neighborhood prompts but {len(answers)} neighborhood answers in {request!r}"
            )
    return EditCase(
        prompt=_fill(str(prompt), subject),
        target_new=target_new,
        target_true=target_true,
        subject=subject,
        paraphrase_prompts=tuple(paraphrases),
        neighborhood_prompts=tuple(neighbors),
        neighborhood_answers=answers,
    )


# --- tokenization -------------------------------------------------------------------------------


def _context_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt.rstrip()).input_ids
    if not ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to nothing")
    return list(ids)


def _target_ids(tokenizer, target: str) -> list[int]:
    text = target if target[:1].isspace() else " " + target
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return list(ids)


# --- locality baseline --------------------------------------------------------------------------


@dataclass
class LocalityBaseline:
    """What the unedited model predicted on each neighborhood prompt (for zsRE-style locality).

    ``entries`` maps ``(neighborhood prompt, answer or None)`` to ``(target ids, argmax ids)``:
    the tokens that are teacher-forced after the prompt, and the unedited model's argmax at those
    positions. With an answer, the target is the answer's tokens (EasyEdit's protocol); without
    one, it is the unedited model's own greedy continuation, so argmax == target.
    """

    entries: dict[tuple[str, str | None], tuple[list[int], list[int]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key) -> bool:
        return key in self.entries


def _neighbor_keys(cases: Iterable[EditCase]) -> list[tuple[str, str | None]]:
    keys: dict[tuple[str, str | None], None] = {}
    for case in cases:
        answers = case.neighborhood_answers or (None,) * len(case.neighborhood_prompts)
        for prompt, answer in zip(case.neighborhood_prompts, answers):
            keys[(prompt, answer)] = None
    return list(keys)


def locality_baseline(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    progress: bool = False,
) -> LocalityBaseline:
    """Record the UNEDITED model's predictions on every neighborhood prompt of ``requests``.

    Compute it once before editing (on all requests that will be edited) and pass it to
    :func:`evaluate_edits` as ``baseline=``. Neighborhood prompts without an answer are continued
    greedily for ``max_new_tokens`` tokens (stopping at EOS) and that continuation is the target.
    """
    cases = [normalize_request(r) for r in requests]
    keys = _neighbor_keys(cases)
    pad = pad_token_id(tokenizer)
    baseline = LocalityBaseline()
    unanswered = [k for k in keys if k[1] is None]
    targets: dict[tuple[str, str | None], list[int]] = {}
    if unanswered:
        conts = generate_greedy(
            model,
            tokenizer,
            [k[0].rstrip() for k in unanswered],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            desc="locality baseline (generate)",
        )
        for key, text in zip(unanswered, conts):
            ids = tokenizer(text, add_special_tokens=False).input_ids if text else []
            if not ids:  # the model ended at once: score its EOS (or pad) token
                ids = [getattr(tokenizer, "eos_token_id", None) or pad]
            targets[key] = list(ids)
    for key in keys:
        if key[1] is not None:
            targets[key] = _target_ids(tokenizer, key[1])
    items = [(_context_ids(tokenizer, k[0]), targets[k]) for k in keys]
    scores = score_continuations(
        model, items, pad_id=pad, batch_size=batch_size, progress=progress, desc="locality baseline"
    )
    for key, score in zip(keys, scores):
        baseline.entries[key] = (score.target, score.argmax)
    return baseline


# --- evaluation ---------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def live_success(continuation: str, target: str) -> bool:
    """Whether a decoded continuation, stripped, starts with the stripped target."""
    return continuation.strip().startswith(target.strip())


def _live_scores(
    model: torch.nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int,
    progress: bool,
) -> list[float]:
    """1.0 / 0.0 per ``(prompt, target)``: greedy decoding from the prompt, as many new tokens as
    the target has plus one, succeeds when :func:`live_success` holds. One batched generation per
    distinct target length."""
    groups: dict[int, list[int]] = {}
    for i, (_, target) in enumerate(pairs):
        groups.setdefault(len(_target_ids(tokenizer, target)) + 1, []).append(i)
    out = [0.0] * len(pairs)
    for length, members in sorted(groups.items()):
        texts = generate_greedy(
            model,
            tokenizer,
            [pairs[i][0].rstrip() for i in members],
            max_new_tokens=length,
            batch_size=batch_size,
            progress=progress,
            desc=f"live decoding ({length} tokens)",
        )
        for i, text in zip(members, texts):
            out[i] = float(live_success(text, pairs[i][1]))
    return out


def evaluate_edits(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence,
    style: str = "counterfact",
    *,
    baseline: LocalityBaseline | None = None,
    batch_size: int = 16,
    progress: bool = True,
    per_edit: bool = False,
    live: bool = False,
    seed: int = 0,
) -> dict:
    """Efficacy, generalization and locality (each in [0, 1], or nan if undefined) over ``requests``.

    ``style`` is ``"counterfact"`` or ``"zsre"`` (see the module docstring). ``baseline`` (from
    :func:`locality_baseline` on the unedited model) is used by the zsRE style only.

    ``live=True`` adds ``"live_efficacy"`` and ``"live_generalization"``: the share of edit (and
    paraphrase) prompts whose greedy continuation — as many new tokens as ``target_new`` has,
    plus one — starts with ``target_new`` once both are stripped (:func:`live_success`). This is
    what a user of the edited model sees; teacher-forced P(new) > P(true) can count an edit as a
    success while the model still says something else. It costs one batched generation per
    distinct target length.

    The result also holds ``"n"`` (each metric's number of edits with a score) and
    ``"intervals"`` (each metric's 95 % interval over edits, ``[lo, hi]``; see
    :mod:`.intervals`; bootstrap seeded with ``seed``). With ``per_edit=True`` it also holds
    ``"per_edit"``: one dict of the scores per request, in order (to see which earlier edits were
    forgotten), with, per metric, ``<metric>_prob`` (the mean over its prompts of P(wanted target) =
    exp(mean log-prob over the target's tokens); the wanted target is ``target_new`` for efficacy and
    generalization, the true answer for locality) and, in the CounterFact style, ``<metric>_margin``
    (the mean of mean log P(wanted) − mean log P(other), whose sign is the success flag).
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    cases = [normalize_request(r) for r in requests]
    pad = pad_token_id(tokenizer)

    # One flat list of (context, target) items; `plan` records which items each metric compares.
    items: list[tuple[list[int], list[int]]] = []
    index: dict[tuple[str, str], int] = {}

    def item(prompt: str, target: str | list[int]) -> int:
        key = (prompt, target if isinstance(target, str) else "\0" + ",".join(map(str, target)))
        if key not in index:
            tgt = _target_ids(tokenizer, target) if isinstance(target, str) else target
            index[key] = len(items)
            items.append((_context_ids(tokenizer, prompt), tgt))
        return index[key]

    plan: list[dict[str, list[tuple]]] = []
    for case in cases:
        entry: dict[str, list[tuple]] = {"efficacy": [], "generalization": [], "locality": []}
        rewrite_prompts = [("efficacy", case.prompt)] + [
            ("generalization", p) for p in case.paraphrase_prompts
        ]
        for metric, prompt in rewrite_prompts:
            if style == "counterfact":
                if case.target_true is None:
                    raise ValueError(
                        f"CounterFact-style metrics need target_true; request {case.prompt!r} has none"
                    )
                entry[metric].append(
                    ("prefer", item(prompt, case.target_new), item(prompt, case.target_true))
                )
            else:
                entry[metric].append(("acc", item(prompt, case.target_new)))
        answers = case.neighborhood_answers or (None,) * len(case.neighborhood_prompts)
        for prompt, answer in zip(case.neighborhood_prompts, answers):
            if style == "counterfact":
                truth = answer if answer is not None else case.target_true
                if truth is None:
                    raise ValueError(
                        f"CounterFact-style locality needs neighborhood answers or target_true ({case.prompt!r})"
                    )
                entry["locality"].append(("prefer", item(prompt, truth), item(prompt, case.target_new)))
            elif baseline is not None:
                key = (prompt, answer)
                if key not in baseline:
                    raise KeyError(
                        f"neighborhood prompt {prompt!r} (answer {answer!r}) is not in the locality baseline; "
                        "compute locality_baseline() on the unedited model for all requests"
                    )
                target_ids, expected = baseline.entries[key]
                entry["locality"].append(("agree", item(prompt, target_ids), expected))
            elif answer is not None:
                entry["locality"].append(("acc", item(prompt, answer)))
            else:
                raise ValueError(
                    "zsRE-style locality needs neighborhood answers or a baseline from locality_baseline() "
                    f"(request {case.prompt!r})"
                )
        plan.append(entry)

    scores = score_continuations(
        model, items, pad_id=pad, batch_size=batch_size, progress=progress, desc=f"edit metrics ({style})"
    )

    def value(op: tuple, s: list[ContinuationScore]) -> float:
        if op[0] == "prefer":
            return float(s[op[1]].mean_logprob > s[op[2]].mean_logprob)
        if op[0] == "acc":
            return s[op[1]].token_accuracy
        return s[op[1]].agreement(op[2])

    rows = [{m: _mean([value(op, scores) for op in ops]) for m, ops in entry.items()} for entry in plan]
    if per_edit:  # the probabilities behind each success flag, for paired tests between runs
        for row, entry in zip(rows, plan):
            for m, ops in entry.items():
                row[f"{m}_prob"] = _mean([math.exp(scores[op[1]].mean_logprob) for op in ops])
                prefer = [op for op in ops if op[0] == "prefer"]
                if prefer:
                    row[f"{m}_margin"] = _mean([scores[op[1]].mean_logprob - scores[op[2]].mean_logprob
                                                for op in prefer])
    metrics = ["efficacy", "generalization", "locality"]
    if live:  # one generation pass over every edit and paraphrase prompt, then split back per edit
        live_prompts = {
            "live_efficacy": [[c.prompt] for c in cases],
            "live_generalization": [list(c.paraphrase_prompts) for c in cases],
        }
        pairs = [(p, c.target_new) for per_case in live_prompts.values() for c, ps in zip(cases, per_case) for p in ps]
        flat = iter(_live_scores(model, tokenizer, pairs, batch_size=batch_size, progress=progress))
        for metric, per_case in live_prompts.items():
            metrics.append(metric)
            for row, ps in zip(rows, per_case):
                row[metric] = _mean([next(flat) for _ in ps])
    result: dict = {}
    n: dict[str, int] = {}
    intervals: dict[str, list[float]] = {}
    for m in metrics:
        values = [r[m] for r in rows if not math.isnan(r[m])]
        result[m] = _mean(values)
        n[m] = len(values)
        intervals[m] = list(mean_interval(values, seed=seed))
    result["n"] = n
    result["intervals"] = intervals
    if per_edit:
        result["per_edit"] = rows
    return result
