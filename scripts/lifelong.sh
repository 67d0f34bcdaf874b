#!/usr/bin/env bash
# The lifelong study (README "Lifelong editing"): 1,000 sequential CounterFact edits (NUM_EDITS=2000
# extends the same runs) on SmolLM2-135M in batches of 100, MEMIT and AlphaEdit, each with and without
# PRUNE (one editing pass writes both: restrained once, as if the run ended at each checkpoint), both
# with MPES (the speed that fits 1,000 edits into a session on 2 cores). Checkpoints every 200 edits
# score a seeded sample of 400 of the edits so far (teacher-forced and live decoding), RTE on 400
# examples, SAMSum on 50 (its interval is ±0.03), perplexity on 100 texts. `rome` / `rome-every` are
# the paper's own setting: ROME single edits to 500 (none and once in one pass; every 10), checkpoints
# every 100. Resumable: run it again after an interruption. Records go to docs/lifelong/runs/, the
# report to docs/lifelong/ (ROME's to docs/lifelong/rome/). `field` is the MEMIT+MPES pass with checkpoints
# at 0/500/1000 that also writes the spectral variants restrained once (docs/restraints.md: a relative
# threshold 0.5·σmax(W); protection of W's top subspaces holding half its energy, damped by 0.8, alone and
# before PRUNE); `field-alphaedit` is AlphaEdit ± PRUNE on the same stream and checkpoints; `field-every` runs those variants every 100 edits (one pass each). Resuming `field` with
# variants added mid-run starts their rows at the resumed point.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/run_records.sh
DATA=${PRUNE_EXT_DATA:-../shared/data}
SHARED=(--data "$DATA/counterfact/counterfact-edit.json" --restrain log --alpha 1.2 --eval-edits 400 --live
        --tasks rte,samsum,perplexity --limit rte=400,samsum=50,perplexity=100 --corpus "$DATA/tasks/nq-open.jsonl")
BATCHES=(--num-edits "${NUM_EDITS:-1000}" --batch-size 100 --mpes --eval-every 200)
SINGLE=(--num-edits "${NUM_EDITS:-500}" --eval-every 100)  # ROME: single edits, checkpoints every 100
pass() { OMP_NUM_THREADS=${THREADS:-1} .venv/bin/prune-ext run "${SHARED[@]}" "$@"; }
BATCHED_RUNS=(lifelong-memit lifelong-memit-prune lifelong-alphaedit lifelong-alphaedit-prune)
ROME_RUNS=(lifelong-rome lifelong-rome-prune lifelong-rome-every10)
FIELD=(--num-edits "${NUM_EDITS:-1000}" --batch-size 100 --mpes --eval-every 500 --editor memit)
VARIANTS=(scale05=scale=0.5 protect50=restrain=none,protect=0.5,damp=0.8 protect50-prune=protect=0.5,damp=0.8)
FIELD_RUNS=(field-memit field-memit-prune "${VARIANTS[@]/#/field-memit-}")
FIELD_RUNS=("${FIELD_RUNS[@]%%=*}")
FIELD_ALPHAEDIT_RUNS=(field-memit field-alphaedit field-alphaedit-prune)  # with MEMIT's for the editors' pair
FIELD_ALPHAEDIT=("${FIELD[@]/#memit/alphaedit}")
case "${1:-all}" in
  alphaedit) pass "${BATCHES[@]}" --editor alphaedit --out runs/lifelong-alphaedit-prune --unrestrained-out runs/lifelong-alphaedit ;;
  memit)     pass "${BATCHES[@]}" --editor memit --out runs/lifelong-memit-prune --unrestrained-out runs/lifelong-memit ;;
  # the paper's own setting (its Table 6 scale): ROME single edits to 500
  rome)       pass "${SINGLE[@]}" --editor rome --out runs/lifelong-rome-prune --unrestrained-out runs/lifelong-rome ;;
  rome-every) pass "${SINGLE[@]}" --editor rome --every 10 --out runs/lifelong-rome-every10 ;;
  field-alphaedit)  # the same stream and checkpoints as `field`, AlphaEdit ± PRUNE
    pass "${FIELD_ALPHAEDIT[@]}" --out runs/field-alphaedit-prune --unrestrained-out runs/field-alphaedit ;;
  field) pass "${FIELD[@]}" --out runs/field-memit-prune --unrestrained-out runs/field-memit \
           "${VARIANTS[@]/#/--variant-out=runs/field-memit-}" ;;
  field-every)
    pass "${FIELD[@]}" --every 100 --threshold-scale 0.5 --out runs/field-memit-scale05-every100
    pass "${FIELD[@]}" --every 100 --restrain none --protect-energy 0.5 --protect-damp 0.8 \
      --out runs/field-memit-protect50-every100 ;;
  field-report)
    copy_records docs/lifelong/runs "${FIELD_RUNS[@]}" "${FIELD_ALPHAEDIT_RUNS[@]:1}" field-memit-scale05-every100 \
      field-memit-protect50-every100
    report_records docs/lifelong/field/alphaedit docs/lifelong/runs "${FIELD_ALPHAEDIT_RUNS[@]}"
    report_records docs/lifelong/field docs/lifelong/runs "${FIELD_RUNS[@]}" field-memit-scale05-every100 \
      field-memit-protect50-every100 ;;
  report)
    copy_records docs/lifelong/runs "${BATCHED_RUNS[@]}" "${ROME_RUNS[@]}"
    report_records docs/lifelong docs/lifelong/runs "${BATCHED_RUNS[@]}"
    report_records docs/lifelong/rome docs/lifelong/runs "${ROME_RUNS[@]}" ;;
  all) for p in alphaedit memit report; do "$0" "$p"; done ;;
  *) echo "usage: $0 [alphaedit|memit|rome|rome-every|field|field-alphaedit|field-every|field-report|report|all]" >&2; exit 2 ;;
esac
