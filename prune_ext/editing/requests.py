"""Edit requests and loaders for the CounterFact and zsRE data sets.

An :class:`EditRequest` holds what an editor needs (``prompt``, ``subject``, ``target_new``) and
what an evaluation needs: the original answer, paraphrases (generalisation) and neighbourhood
prompts with their answers (locality).

Three on-disk layouts are understood:

* CounterFact, flattened (EasyEdit): ``prompt, subject, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth`` (``../shared/data/counterfact``);
* CounterFact, ROME-native: ``requested_rewrite{prompt, subject, target_new{str}, target_true{str}},
  paraphrase_prompts, neighborhood_prompts, ...``;
* zsRE, MEND layout: ``subject, src, alt, answers, rephrase, loc, loc_ans``.

A malformed record raises :class:`ValueError` naming the source, the record index and the field.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "EditRequest",
    "RecordError",
    "as_request",
    "as_requests",
    "data_dir",
    "load_counterfact",
    "load_requests",
    "load_zsre",
    "parse_counterfact_record",
    "parse_zsre_record",
]

log = logging.getLogger(__name__)


class RecordError(ValueError):
    """A malformed request record; the message names the source, the record and the field."""


@dataclass(frozen=True)
class EditRequest:
    """One factual edit: make the model continue ``prompt`` with ``target_new``.

    ``prompt`` is the full text with the subject in it (a ``"{}"`` placeholder is filled with
    ``subject`` on construction). Targets are stored without a leading space; editors add the
    separating space themselves. ``neighborhood_answers`` is empty or parallel to
    ``neighborhood_prompts``.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_answers: tuple[str, ...] = ()
    case_id: int | str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"EditRequest: field {name!r} must be a non-empty string, got {value!r}")
        if "{}" in self.prompt:
            object.__setattr__(self, "prompt", self.prompt.replace("{}", self.subject, 1))
        if self.subject not in self.prompt:
            raise ValueError(
                f"EditRequest: field 'subject' ({self.subject!r}) does not occur in prompt {self.prompt!r}"
            )
        object.__setattr__(self, "prompt", self.prompt.rstrip())
        object.__setattr__(self, "target_new", self.target_new.strip())
        if self.target_true is not None:
            object.__setattr__(self, "target_true", self.target_true.strip())
        for name in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.neighborhood_answers and len(self.neighborhood_answers) != len(self.neighborhood_prompts):
            raise ValueError(
                "EditRequest: field 'neighborhood_answers' must be empty or as long as "
                f"'neighborhood_prompts' ({len(self.neighborhood_answers)} != {len(self.neighborhood_prompts)})"
            )

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span ``(start, end)`` of the (first occurrence of the) subject in ``prompt``."""
        start = self.prompt.index(self.subject)
        return start, start + len(self.subject)

    @property
    def template(self) -> str:
        """``prompt`` with the subject replaced by ``"{}"`` (the ROME convention)."""
        start, end = self.subject_span
        return self.prompt[:start] + "{}" + self.prompt[end:]


def data_dir() -> Path:
    """The shared evaluation data folder (``$PRUNE_EXT_DATA`` or the checkout's default; one rule for
    requests and tasks: :func:`prune_ext.evaluation.tasks.resolve_data_dir`)."""
    from ..evaluation.tasks import resolve_data_dir

    return resolve_data_dir()


# ---------------------------------------------------------------------------------------------
# record parsing


def _field(record: Mapping[str, Any], name: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if not isinstance(record, Mapping):
        raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise RecordError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RecordError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise RecordError(f"{where}: field {name!r} is empty")
    return value


def _optional_str(record: Mapping[str, Any], name: str, where: str) -> str | None:
    return _field(record, name, where) if record.get(name) is not None else None


def _str_list(record: Mapping[str, Any], name: str, where: str) -> tuple[str, ...]:
    """A list of strings, or a single string, or absent (empty)."""
    value = record.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"{where}: field {name!r} must be a string or a list of strings")
    return tuple(value)


def _target_str(value: Any, name: str, where: str) -> str:
    """ROME-native targets are ``{"str": ..., "id": ...}``; plain strings are accepted too."""
    if isinstance(value, Mapping):
        value = value.get("str")
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: field {name!r} must be a non-empty string or {{'str': ...}}")
    return value


def _build(where: str, **kwargs: Any) -> EditRequest:
    try:
        return EditRequest(**kwargs)
    except ValueError as exc:
        raise RecordError(f"{where}: {str(exc).removeprefix('EditRequest: ')}") from None


def parse_counterfact_record(record: Mapping[str, Any], where: str = "record") -> EditRequest:
    """Parse one CounterFact record in either the flattened or the ROME-native layout."""
    if isinstance(record, Mapping) and "requested_rewrite" in record:
        return _parse_counterfact_native(record, where)
    return _parse_counterfact_flat(record, where)


def _parse_counterfact_flat(record: Mapping[str, Any], where: str) -> EditRequest:
    prompt = _field(record, "prompt", where)
    subject = _field(record, "subject", where)
    target_new = _target_str(_field(record, "target_new", where, (str, Mapping)), "target_new", where)
    truth = record.get("ground_truth", record.get("target_true"))
    target_true = _target_str(truth, "ground_truth", where) if truth is not None else None
    locality = _str_list(record, "locality_prompt", where)
    answers = _str_list(record, "locality_ground_truth", where)
    if locality and not answers:
        raise RecordError(f"{where}: field 'locality_ground_truth' is missing for 'locality_prompt'")
    if len(answers) == 1 and len(locality) > 1:
        answers = answers * len(locality)
    return _build(
        where,
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=_str_list(record, "rephrase_prompt", where),
        neighborhood_prompts=locality,
        neighborhood_answers=answers,
        case_id=record.get("case_id"),
    )


def _parse_counterfact_native(record: Mapping[str, Any], where: str) -> EditRequest:
    rewrite = _field(record, "requested_rewrite", where, Mapping)
    inner = f"{where}: requested_rewrite"
    template = _field(rewrite, "prompt", inner)
    subject = _field(rewrite, "subject", inner)
    target_new = _target_str(rewrite.get("target_new"), "requested_rewrite.target_new", where)
    truth = rewrite.get("target_true")
    target_true = _target_str(truth, "requested_rewrite.target_true", where) if truth is not None else None
    neighborhood = _str_list(record, "neighborhood_prompts", where)
    return _build(
        where,
        prompt=template,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=_str_list(record, "paraphrase_prompts", where),
        neighborhood_prompts=neighborhood,
        neighborhood_answers=(target_true,) * len(neighborhood) if target_true else (),
        case_id=record.get("case_id"),
        extra={k: record[k] for k in ("attribute_prompts", "generation_prompts", "relation_id") if k in record},
    )


def parse_zsre_record(record: Mapping[str, Any], where: str = "record") -> EditRequest:
    """Parse one zsRE record in the MEND layout (``src`` prompt, ``alt`` new target, ``loc`` locality)."""
    answers = _field(record, "answers", where, (list, str))
    if isinstance(answers, str):
        answers = [answers]
    if answers and not all(isinstance(a, str) for a in answers):
        raise RecordError(f"{where}: field 'answers' must be a list of strings")
    truth = answers[0] if answers else record.get("pred")
    locality = _str_list(record, "loc", where)
    loc_answers = _str_list(record, "loc_ans", where)
    if locality and not loc_answers:
        raise RecordError(f"{where}: field 'loc_ans' is missing for 'loc'")
    return _build(
        where,
        prompt=_field(record, "src", where),
        subject=_field(record, "subject", where),
        target_new=_field(record, "alt", where),
        target_true=truth,
        paraphrase_prompts=_str_list(record, "rephrase", where),
        neighborhood_prompts=locality,
        neighborhood_answers=loc_answers,
        case_id=record.get("case_id"),
    )


# ---------------------------------------------------------------------------------------------
# files


def _read_records(path: Path) -> list[Any]:
    """A JSON list, or JSON Lines (one object per line)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RecordError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


OnError = Literal["raise", "skip"]


def _load(path: Path, parse: Any, limit: int | None, on_error: OnError) -> list[EditRequest]:
    """Parse records; ``limit`` counts records read (bad ones included) so indices stay stable."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    records = _read_records(path)
    if limit is not None:
        records = records[:limit]
    out = []
    for i, record in enumerate(records):
        try:
            out.append(parse(record, f"{path.name}: record {i}"))
        except RecordError as exc:
            if on_error == "raise":
                raise RecordError(f"{exc} (pass on_error='skip' to drop malformed records)") from None
            log.warning("skipping malformed record: %s", exc)
    return out


def load_counterfact(
    path: str | os.PathLike[str] | None = None, *, limit: int | None = None, on_error: OnError = "raise"
) -> list[EditRequest]:
    """CounterFact records (either layout, detected per record) from a .json list or .jsonl file.

    Defaults to ``data_dir()/counterfact/counterfact-edit-1k.json``. A malformed record raises
    :class:`RecordError` (a ``ValueError``), or is logged and dropped with ``on_error="skip"``.
    """
    target = Path(path) if path is not None else data_dir() / "counterfact" / "counterfact-edit-1k.json"
    return _load(target, parse_counterfact_record, limit, on_error)


def load_zsre(
    path: str | os.PathLike[str] | None = None, *, limit: int | None = None, on_error: OnError = "raise"
) -> list[EditRequest]:
    """zsRE records in the MEND layout. Defaults to ``data_dir()/zsre/zsre_mend_train-1k.json``.

    Note: the shared 1k file has two records with an empty ``alt`` (534 and 723); load it with
    ``on_error="skip"``.
    """
    target = Path(path) if path is not None else data_dir() / "zsre" / "zsre_mend_train-1k.json"
    return _load(target, parse_zsre_record, limit, on_error)


def load_requests(
    path: str | os.PathLike[str], *, limit: int | None = None, on_error: OnError = "raise"
) -> list[EditRequest]:
    """Any supported layout, detected from the first record's keys (zsRE if it has ``src``)."""
    target = Path(path)
    records = _read_records(target)
    first = records[0] if records else {}
    parse = parse_zsre_record if isinstance(first, Mapping) and "src" in first else parse_counterfact_record
    return _load(target, parse, limit, on_error)


def as_request(obj: EditRequest | Mapping[str, Any], where: str = "request") -> EditRequest:
    """An :class:`EditRequest` from itself or from a plain dict.

    A dict needs ``prompt`` (containing the subject or a ``"{}"`` placeholder), ``subject`` and
    ``target_new``; CounterFact and zsRE records are accepted as well.
    """
    if isinstance(obj, EditRequest):
        return obj
    if not isinstance(obj, Mapping):
        raise RecordError(f"{where}: expected an EditRequest or a dict, got {type(obj).__name__}")
    if "src" in obj and "alt" in obj:
        return parse_zsre_record(obj, where)
    return parse_counterfact_record(obj, where)


def as_requests(
    objs: Iterable[EditRequest | Mapping[str, Any]] | EditRequest | Mapping[str, Any],
) -> list[EditRequest]:
    """A list of requests from one request or an iterable of them."""
    if isinstance(objs, (EditRequest, Mapping)):
        objs = [objs]
    return [as_request(obj, f"request {i}") for i, obj in enumerate(objs)]
