# Sourced by the study scripts: copy_records DEST RUN... copies each run's records (config.json,
# trace.jsonl and, once it has finished, results.json; never the weights) from runs/RUN to DEST/RUN.
# Runs without a trace yet are skipped.
copy_records() {
  local dest=$1 run
  shift
  for run in "$@"; do
    [ -f "runs/$run/trace.jsonl" ] || continue
    mkdir -p "$dest/$run"
    cp "runs/$run/config.json" "runs/$run/trace.jsonl" "$dest/$run/"
    if [ -f "runs/$run/results.json" ]; then cp "runs/$run/results.json" "$dest/$run/"; fi
  done
}

# report_records OUT DEST RUN...: `prune-ext report` of those runs that DEST holds, drawn into OUT
# (nothing when it holds none of them).
report_records() {
  local out=$1 dest=$2 run have=()
  shift 2
  for run in "$@"; do
    if [ -d "$dest/$run" ]; then have+=("$dest/$run"); fi
  done
  if [ ${#have[@]} -gt 0 ]; then .venv/bin/prune-ext report "${have[@]}" --out "$out"; fi
}
