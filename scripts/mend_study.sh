#!/usr/bin/env bash
# 100 sequential MEND edits on SmolLM2-135M with and without PRUNE (once, every 10): README "MEND".
# The edits are the packaged editor's 100 held-out CounterFact records (its validation split, never
# trained on), written to runs/mend-heldout.json from the shared data. Resumable: run it again after
# an interruption. Traces, configs and results are copied to docs/mend/runs/; the report is drawn there.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/run_records.sh
DATA=${PRUNE_EXT_DATA:-../shared/data}
PY=.venv/bin/python
P=.venv/bin/prune-ext
mkdir -p runs
$PY - "$DATA/counterfact/counterfact-edit.json" runs/mend-heldout.json <<'PYEOF'
import json, sys
from prune_ext.editing.mend import PACKAGED_WEIGHTS
from prune_ext.io import write_json
records = json.load(open(sys.argv[1]))
held_out = json.loads((PACKAGED_WEIGHTS / "smollm2-135m" / "mend.json").read_text())["validation_records"]
write_json(sys.argv[2], [records[i] for i in held_out])
PYEOF
COMMON=(--editor mend --data runs/mend-heldout.json --num-edits "${NUM_EDITS:-100}" --restrain log --alpha 1.2
        --eval-every 25 --limit 100 --tasks rte,perplexity)
pass() { OMP_NUM_THREADS=${THREADS:-1} "$P" run "${COMMON[@]}" "$@"; }
case "${1:-all}" in
  once)  pass --out runs/mend-prune --unrestrained-out runs/mend-plain ;;
  every) pass --every 10 --out runs/mend-every10 ;;
  report)
    copy_records docs/mend/runs mend-prune mend-plain mend-every10
    R=docs/mend/runs
    "$P" report $R/mend-prune $R/mend-plain $R/mend-every10 --out docs/mend/sequential ;;
  all) for p in once every report; do "$0" "$p"; done ;;
  *) echo "usage: $0 [once|every|report|all]" >&2; exit 2 ;;
esac
