"""Single-edit efficacy / generalization / locality of a trained MEND editor on held-out records.

    python benchmarks/eval_mend.py                                   # the packaged SmolLM2 editor
    python benchmarks/eval_mend.py --editor runs/mend --n 200 --threads 1 --out docs/mend/eval.json

Each record is one edit on the unedited model (computed with ``Mend.compute``, applied, scored with
``prune_ext.evaluation.evaluate_edits(..., "counterfact")``: P(new) > P(true) on the prompt, on its
paraphrase, and locality = the neighbourhood prompt still prefers its own answer), then the edited
matrices are restored exactly. Records are the editor's validation records (held out of training),
read from its ``mend.json``, and with ``--unvisited M`` also M training records the run never reached
(its edits covered only the start of the first epoch). ``--sequential K`` also edits the first K
records one after another (each computed on the model with the earlier edits applied) and scores
all K at the end.
Prints a Markdown table; ``--out`` writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from prune_ext.editing import apply_update, load_model, load_requests, make_editor
from prune_ext.editing.mend.train import _digest, unvisited_records
from prune_ext.editing.models import get_module
from prune_ext.editing.requests import data_dir
from prune_ext.evaluation import evaluate_edits
from prune_ext.io import write_json


def interval(successes: float, n: int) -> str:
    """A 95 % Wilson interval for a proportion."""
    if n == 0:
        return "–"
    p, z = successes / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"[{centre - half:.2f}, {centre + half:.2f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--editor", help="train-mend output folder (default: the packaged editor)")
    ap.add_argument("--data", default=str(data_dir() / "counterfact" / "counterfact-edit.json"))
    ap.add_argument("--n", type=int, default=100, help="held-out records to edit one at a time")
    ap.add_argument("--unvisited", type=int, default=0, help="also M training records the run never edited")
    ap.add_argument("--sequential", type=int, default=0, help="also K sequential edits")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    records = load_requests(args.data, on_error="skip")
    model, tok = load_model("smollm2-135m")
    hparams = {"editor_path": args.editor} if args.editor else None
    editor = make_editor(model, tok, "mend", hparams, progress=False)
    meta = editor.editor_meta
    held_out = meta.get("validation_records")
    if not held_out:
        print(f"{editor.editor_folder}/mend.json lists no validation records", file=sys.stderr)
        return 2
    if meta.get("data_digest") and _digest(records) != meta["data_digest"]:
        print(f"{args.data} is not the data the editor was trained on", file=sys.stderr)
        return 2
    indices = held_out[: args.n]
    if args.unvisited:
        indices += unvisited_records(meta, len(records))[: args.unvisited]
    chosen = [records[i] for i in indices]
    names = editor.edited_modules()
    original = {n: get_module(model, n).weight.detach().clone() for n in names}

    def restore() -> None:
        with torch.no_grad():
            for n, w in original.items():
                get_module(model, n).weight.copy_(w)

    before = evaluate_edits(model, tok, chosen, "counterfact", progress=False, per_edit=True)["per_edit"]
    rows, times, ranks = [], [], []
    for i, req in enumerate(chosen):
        start = time.perf_counter()
        updates = editor.compute(req)
        times.append(time.perf_counter() - start)
        ranks.append(updates[0].rank)
        for u in updates:
            apply_update(model, u)
        rows.append(evaluate_edits(model, tok, [req], "counterfact", progress=False))
        restore()
        print(f"\r{i + 1}/{len(chosen)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    keys = ("efficacy", "generalization", "locality")
    result: dict = {"editor": str(editor.editor_folder), "n": len(chosen), "records": indices,
                    "seconds_per_edit": statistics.median(times), "rank_median": statistics.median(ranks)}
    print(f"MEND editor {editor.editor_folder} ({meta.get('steps')} steps, {meta.get('parameters')} parameters), "
          f"{len(chosen)} CounterFact records never trained on ({min(args.n, len(held_out))} validation, "
          f"{len(indices) - min(args.n, len(held_out))} unvisited), one edit each on the unedited model\n")
    print("| metric | unedited | after one MEND edit | 95 % interval | n |")
    print("|---|---|---|---|---|")
    for k in keys:
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        pre = [b[k] for b in before if not math.isnan(b[k])]
        result[k] = sum(vals) / len(vals)
        result[f"{k}_unedited"] = sum(pre) / len(pre)
        print(f"| {k} | {result[f'{k}_unedited']:.3f} | {result[k]:.3f} | {interval(sum(vals), len(vals))} "
              f"| {len(vals)} |")
    print(f"\nmedian compute time per edit {result['seconds_per_edit']:.2f} s ({args.threads} thread(s)); "
          f"median update rank {result['rank_median']:.0f}")

    if args.sequential:
        seq = chosen[: args.sequential]
        for req in seq:
            for u in editor.compute(req):
                apply_update(model, u)
        final = evaluate_edits(model, tok, seq, "counterfact", progress=False)
        restore()
        result["sequential"] = {"edits": len(seq), **{k: final[k] for k in keys}}
        print(f"\n{len(seq)} sequential edits, all scored at the end: "
              + ", ".join(f"{k} {final[k]:.3f}" for k in keys))
    if args.out:
        write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
