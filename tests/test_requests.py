"""Edit requests and the CounterFact / zsRE loaders (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prune_ext.editing.requests import (
    EditRequest,
    RecordError,
    as_request,
    as_requests,
    data_dir,
    load_counterfact,
    load_requests,
    load_zsre,
)

DATA = data_dir()
COUNTERFACT = DATA / "counterfact" / "counterfact-edit-1k.json"
ZSRE = DATA / "zsre" / "zsre_mend_train-1k.json"
needs_counterfact = pytest.mark.skipif(not COUNTERFACT.is_file(), reason=f"shared data absent: {COUNTERFACT}")
needs_zsre = pytest.mark.skipif(not ZSRE.is_file(), reason=f"shared data absent: {ZSRE}")

NATIVE = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Raymond Barre's mother tongue is"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
FLAT = {
    "case_id": 1,
    "prompt": "The Eiffel Tower is located in",
    "subject": "Eiffel Tower",
    "target_new": "Rome",
    "ground_truth": "Paris",
    "rephrase_prompt": "Where is the Eiffel Tower? It is in",
    "locality_prompt": "The Louvre is located in",
    "locality_ground_truth": "Paris",
}
ZSRE_RECORD = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: who wrote the big lebowski",
    "loc_ans": "the Coen brothers",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}


def _write(tmp_path: Path, records: list, name: str = "records.json") -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


def test_plain_dict_with_placeholder_or_subject() -> None:
    a = as_request({"prompt": "{} is located in", "subject": "Eiffel Tower", "target_new": "Rome"})
    b = as_request({"prompt": "Eiffel Tower is located in", "subject": "Eiffel Tower", "target_new": " Rome"})
    assert a == b
    assert a.prompt == "Eiffel Tower is located in"
    assert a.target_new == "Rome"
    assert a.template == "{} is located in"
    assert a.subject_span == (0, len("Eiffel Tower"))


def test_counterfact_native_layout(tmp_path: Path) -> None:
    [req] = load_counterfact(_write(tmp_path, [NATIVE]))
    assert req.prompt == "The mother tongue of Danielle Darrieux is"
    assert (req.subject, req.target_new, req.target_true) == ("Danielle Darrieux", "English", "French")
    assert req.paraphrase_prompts == tuple(NATIVE["paraphrase_prompts"])
    assert req.neighborhood_prompts == tuple(NATIVE["neighborhood_prompts"])
    assert req.neighborhood_answers == ("French", "French")
    assert req.extra["generation_prompts"] == NATIVE["generation_prompts"]


def test_counterfact_flat_layout_jsonl(tmp_path: Path) -> None:
    [req] = load_counterfact(_write(tmp_path, [FLAT], "cf.jsonl"))
    assert req.prompt == FLAT["prompt"]
    assert req.target_true == "Paris"
    assert req.paraphrase_prompts == (FLAT["rephrase_prompt"],)
    assert req.neighborhood_prompts == ("The Louvre is located in",)
    assert req.neighborhood_answers == ("Paris",)


def test_mixed_layouts_and_autodetect(tmp_path: Path) -> None:
    assert [r.subject for r in load_requests(_write(tmp_path, [FLAT, NATIVE]))] == [
        "Eiffel Tower",
        "Danielle Darrieux",
    ]
    assert load_requests(_write(tmp_path, [ZSRE_RECORD], "z.json"))[0].target_new == "unmanned aircraft"
    assert [r.subject for r in as_requests([FLAT, ZSRE_RECORD])] == ["Eiffel Tower", "UniFirst"]


def test_zsre_record(tmp_path: Path) -> None:
    [req] = load_zsre(_write(tmp_path, [ZSRE_RECORD]))
    assert req.prompt == ZSRE_RECORD["src"]
    assert (req.target_new, req.target_true) == ("unmanned aircraft", "uniform")
    assert req.paraphrase_prompts == (ZSRE_RECORD["rephrase"],)
    assert req.neighborhood_prompts == (ZSRE_RECORD["loc"],)
    assert req.neighborhood_answers == ("the Coen brothers",)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({k: v for k, v in FLAT.items() if k != "subject"}, "subject"),
        ({**FLAT, "subject": "Big Ben"}, "subject"),
        ({**FLAT, "target_new": 3}, "target_new"),
        ({**FLAT, "prompt": "   "}, "prompt"),
        ({**FLAT, "locality_ground_truth": None}, "locality_ground_truth"),
        (
            {**NATIVE, "requested_rewrite": {**NATIVE["requested_rewrite"], "target_new": {"id": "Q1"}}},
            "target_new",
        ),
        ({**NATIVE, "requested_rewrite": "oops"}, "requested_rewrite"),
        ({**NATIVE, "neighborhood_prompts": [1, 2]}, "neighborhood_prompts"),
    ],
)
def test_malformed_counterfact_names_record_and_field(tmp_path: Path, record: dict, field: str) -> None:
    path = _write(tmp_path, [FLAT, record])
    with pytest.raises(ValueError, match=rf"record 1\b.*{field}") as info:
        load_counterfact(path)
    assert isinstance(info.value, RecordError)
    assert path.name in str(info.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [({"alt": None}, "alt"), ({"answers": [1]}, "answers"), ({"src": "What does it make?"}, "subject")],
)
def test_malformed_zsre_names_record_and_field(tmp_path: Path, change: dict, field: str) -> None:
    record = {k: v for k, v in {**ZSRE_RECORD, **change}.items() if v is not None}
    with pytest.raises(RecordError, match=rf"record 2\b.*{field}"):
        load_zsre(_write(tmp_path, [ZSRE_RECORD, ZSRE_RECORD, record]))


def test_skip_malformed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, [FLAT, {**FLAT, "subject": "Big Ben"}, NATIVE])
    assert [r.case_id for r in load_counterfact(path, on_error="skip")] == [1, 0]
    assert "record 1" in caplog.text
    assert len(load_counterfact(path, limit=2, on_error="skip")) == 1


def test_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(FLAT) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        load_counterfact(bad)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps(FLAT))
    with pytest.raises(ValueError, match="JSON list"):
        load_counterfact(obj)
    with pytest.raises(ValueError, match="request 0"):
        as_requests([42])


@needs_counterfact
def test_shared_counterfact_loads() -> None:
    reqs = load_counterfact()
    assert len(reqs) == 1000
    assert all(r.subject in r.prompt and r.target_true and r.paraphrase_prompts for r in reqs)
    assert all(len(r.neighborhood_prompts) == len(r.neighborhood_answers) == 1 for r in reqs)
    assert load_counterfact(limit=3) == reqs[:3]


@needs_zsre
def test_shared_zsre_loads() -> None:
    with pytest.raises(RecordError, match=r"record 534\b.*'alt'.*on_error='skip'"):
        load_zsre()
    reqs = load_zsre(on_error="skip")
    assert len(reqs) == 998  # records 534 and 723 have an empty 'alt'
    assert all(r.subject in r.prompt and r.target_true and r.neighborhood_answers for r in reqs)


def test_data_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRUNE_EXT_DATA", str(tmp_path))
    assert data_dir() == tmp_path


_text = st.text(st.characters(blacklist_characters="{}", blacklist_categories=("Cs",)), min_size=1, max_size=12)


@given(before=_text, subject=_text.filter(str.strip), after=_text, target=_text.filter(str.strip))
def test_template_round_trip(before: str, subject: str, after: str, target: str) -> None:
    req = EditRequest(before + "{}" + after, subject, target)
    assert req.prompt == (before + subject + after).rstrip()
    start, end = req.subject_span
    assert req.prompt[start:end] == subject
    assert req.template.replace("{}", subject, 1) == req.prompt
