#!/usr/bin/env bash
# The reproduction (100 edits; NUM_EDITS=200 extends the same runs) of the paper's Figures 2-4 on SmolLM2-135M (README "Reproduction").
# Each pass is resumable: run the script again after an interruption. Run folders go to runs/ (they
# hold the session's books and the final weights); traces, configs and results are copied to
# docs/reproduction/ and the report is drawn from there.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/run_records.sh
DATA=${PRUNE_EXT_DATA:-../shared/data}
CF=$DATA/counterfact/counterfact-edit-1k.json
COMMON=(--data "$CF" --num-edits "${NUM_EDITS:-100}" --restrain log --alpha 1.2 --eval-every 50 --limit 100
        --tasks rte,perplexity --corpus "$DATA/tasks/nq-open.jsonl")
P=.venv/bin/prune-ext
pass() { OMP_NUM_THREADS=${THREADS:-1} "$P" run "${COMMON[@]}" "$@"; }
case "${1:-all}" in
  rome-once)    pass --editor rome --out runs/rome-prune --unrestrained-out runs/rome-plain ;;
  rome-every)   pass --editor rome --every 25 --out runs/rome-every25 ;;
  memit-once)   pass --editor memit --batch-size 10 --out runs/memit-prune --unrestrained-out runs/memit-plain ;;
  memit-every)  pass --editor memit --batch-size 10 --every 25 --out runs/memit-every25 ;;
  report)
    copy_records docs/reproduction/runs rome-prune rome-plain rome-every25 memit-prune memit-plain memit-every25
    report_records docs/reproduction/rome docs/reproduction/runs rome-prune rome-plain rome-every25
    report_records docs/reproduction/memit docs/reproduction/runs memit-prune memit-plain memit-every25 ;;
  all) for p in rome-once rome-every memit-once memit-every report; do "$0" "$p"; done ;;
  *) echo "usage: $0 [rome-once|rome-every|memit-once|memit-every|report|all]" >&2; exit 2 ;;
esac
