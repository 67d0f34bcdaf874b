#!/usr/bin/env bash
# README's first table: the demo (`prune-ext demo`: ROME on SmolLM2-135M with and without PRUNE) run into
# runs/demo (resumable: run the script again after an interruption); its records (configs, traces,
# results; never the weights) copied to docs/demo/runs and its report drawn into docs/demo, whose
# summary.md README's table is generated from (scripts/readme_tables.py).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/run_records.sh
case "${1:-all}" in
  # wall and CPU time for README (the command line picks its threads from the idle cores: docs/cli.md)
  run) time .venv/bin/prune-ext demo --out runs/demo ;;
  report)
    copy_records docs/demo/runs demo/prune demo/no-prune
    report_records docs/demo docs/demo/runs demo/prune demo/no-prune ;;
  all) "$0" run; "$0" report ;;
  *) echo "usage: $0 [run|report|all]" >&2; exit 2 ;;
esac
