"""Single-edit scores of the packaged SmolLM2 MEND editor on its held-out CounterFact records.

Each record is edited alone on the unedited model (the edit applied, scored, then the weights restored
exactly), so this measures the editor, not sequential editing. The records are the editor's validation
split (``validation_records`` in its ``mend.json``), never trained on. Writes one JSON file with the
mean of every score, its n and its 95 % interval, the same scores of the unedited model, and the
per-record scores, and beside it (``.md``) the table README shows.

    .venv/bin/python scripts/mend_single_edit.py --out docs/mend/single_edit.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from prune_ext.editing import apply_update, load_counterfact, load_model, make_editor
from prune_ext.editing.base import temporarily_applied
from prune_ext.editing.mend import PACKAGED_WEIGHTS
from prune_ext.evaluation import evaluate_edits
from prune_ext.evaluation.intervals import mean_interval
from prune_ext.io import atomic_write_text, write_json

METRICS = ("efficacy", "generalization", "locality")


def table(edited: dict, unedited: dict) -> str:
    """The markdown table README shows (scripts/readme_tables.py copies it there)."""
    def cell(s: dict) -> str:
        return f"{s['mean']:.3f} [{s['interval'][0]:.2f}, {s['interval'][1]:.2f}]"
    lines = ["| score | after one MEND edit | unedited model | n |", "|---|---|---|---|"]
    lines += [f"| {m} | {cell(edited[m])} | {cell(unedited[m])} | {edited[m]['n']} |" for m in METRICS]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(os.environ.get("PRUNE_EXT_DATA", "../shared/data"),
                                                       "counterfact", "counterfact-edit.json"))
    parser.add_argument("--limit", type=int, default=None, help="first N held-out records (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    meta = json.loads((PACKAGED_WEIGHTS / "smollm2-135m" / "mend.json").read_text())
    records = load_counterfact(args.data)
    indices = meta["validation_records"][: args.limit]
    model, tok = load_model("smollm2-135m")
    editor = make_editor(model, tok, "mend", progress=False)
    requests = [records[i] for i in indices]
    unedited = evaluate_edits(model, tok, requests, "counterfact", progress=False)
    rows = []
    for index, request in zip(indices, tqdm(requests, desc="single MEND edits")):
        with temporarily_applied(model, editor.edited_modules()):
            for update in editor.compute(request):
                apply_update(model, update)
            scores = evaluate_edits(model, tok, [request], "counterfact", progress=False, per_edit=True)
        rows.append({"record": index, **{m: scores["per_edit"][0][m] for m in METRICS}})
    summary = {}
    for m in METRICS:
        values = [r[m] for r in rows if r[m] == r[m]]  # nan: undefined for that record
        summary[m] = {"mean": sum(values) / len(values), "n": len(values), "interval": list(mean_interval(values))}
    before = {m: {"mean": unedited[m], "n": unedited["n"][m], "interval": unedited["intervals"][m]} for m in METRICS}
    write_json(Path(args.out), {"editor": meta["model"], "data": args.data, "records": len(rows),
                                "scores": summary, "unedited": before, "per_record": rows})
    atomic_write_text(Path(args.out).with_suffix(".md"), table(summary, before))
    for m, s in summary.items():
        print(f"{m:>15} {s['mean']:.3f}  95% [{s['interval'][0]:.3f}, {s['interval'][1]:.3f}]  n={s['n']}"
              f"   (unedited model: {unedited[m]:.3f})")


if __name__ == "__main__":
    main()
