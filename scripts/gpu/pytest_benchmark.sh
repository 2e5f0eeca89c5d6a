#!/usr/bin/env bash
# Issue 17 on one GPU, in one session: the gate suite timed by `falqon-bench run` and by pytest-benchmark
# (`pytest benchmarks -m gpu --benchmark-json`), then per point the suite's median gpu_ms against
# pytest-benchmark's median, their ratio and whether it is within 3% (printed last).
#   OUT=/tmp/x bash scripts/gpu/pytest_benchmark.sh              # on the H200: about 4-5 minutes
#   OUT=/tmp/x bash scripts/gpu/pytest_benchmark.sh --cpu-smoke  # dry run on CPU with a two-point suite
# Run from the repository root with the project importable. Writes under $OUT (at most 8 files):
#   gate-run.tar.gz (the suite run directory), out.json (pytest-benchmark), gate-export.json (the suite run
#   exported to pytest-benchmark JSON), pytest_benchmark_compare.txt, falqon_compare.txt, medians.md, log.txt
# A failing stage is logged and the next one still runs. Set FALQON_GIT_SHA=<commit> when the tree's .git
# may be stale: the run manifest and out.json's commit_info then name that commit.
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"
suite=suites/gate.toml
select=(-m gpu)
if [ "${1:-}" = "--cpu-smoke" ]; then
  suite=$(mktemp --suffix=.toml)
  cat > "$suite" <<'TOML'
name = "gate"
description = "cpu smoke of scripts/gpu/pytest_benchmark.sh"
device = "cpu"
[timing]
budget_ms = 10
warmup_ms = 2
min_samples = 5
profile = false
[[grid]]
layers = [{ name = "tiny.32x48", K = 32, N = 48 }]
ranks = [8]
tokens = [16]
methods = ["bf16_lora", "falqon"]
TOML
  select=()
fi
stage() { echo "=== $1 ($(date -u +%T))" | tee -a "$LOG"; }
t0=$(date +%s)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee -a "$LOG"

stage "falqon-bench run $suite"
timeout 240 $PY -m falqon_bench.cli run "$suite" --out "$OUT/gate" >>"$LOG" 2>&1 || echo "suite run failed (rc=$?), see log.txt" | tee -a "$LOG"

stage "pytest benchmarks ${select[*]} --benchmark-json"
FALQON_BENCH_SUITE="$suite" timeout 200 $PY -m pytest -p pytest_benchmark -p no:cacheprovider benchmarks "${select[@]}" \
  -q -rs --benchmark-json "$OUT/out.json" --benchmark-columns=min,median,max,rounds >>"$LOG" 2>&1 \
  || echo "pytest benchmarks failed (rc=$?), see log.txt" | tee -a "$LOG"

stage "export the suite run as pytest-benchmark JSON; both tools compare the two files"
$PY -m falqon_bench.cli export "$OUT/gate" --to "$OUT/gate-export.json" --format pytest-benchmark >>"$LOG" 2>&1 || echo "export failed" | tee -a "$LOG"
(cd "$OUT" && $PY -m pytest_benchmark compare gate-export.json out.json --columns=min,median,max,rounds) >"$OUT/pytest_benchmark_compare.txt" 2>&1 \
  && echo "pytest-benchmark compare: exit 0" | tee -a "$LOG" || echo "pytest-benchmark compare failed (rc=$?)" | tee -a "$LOG"
rc=0; $PY -m falqon_bench.cli compare "$OUT/gate" "$OUT/out.json" >"$OUT/falqon_compare.txt" 2>&1 || rc=$?
echo "falqon-bench compare suite-run out.json: exit $rc ($(tail -1 "$OUT/falqon_compare.txt" | sed 's/^ *//; s/ *$//'))" | tee -a "$LOG"
rm -rf "$OUT/.benchmarks"  # pytest-benchmark compare creates its (empty) default storage folder

stage "median table"
$PY scripts/gpu/median_table.py "$OUT/gate" "$OUT/out.json" --tolerance 0.03 >"$OUT/medians.md" 2>>"$LOG" || echo "median table failed" >>"$OUT/medians.md"
[ -d "$OUT/gate" ] && tar czf "$OUT/gate-run.tar.gz" -C "$OUT" gate && rm -rf "$OUT/gate"
echo "total $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
echo
cat "$OUT/medians.md"
