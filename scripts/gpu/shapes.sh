#!/usr/bin/env bash
# The shapes sweep on one H200 (issue 13): falqon's forward GEMM with fast_accum on and off at llama-7b
# attn/up/down r=64, 4096 tokens (~0.5 min), then suites/shapes.toml (~6.5 min, capped), the report and a summary.
# About 7.5 minutes in all, at most 8 (the caps below).
# Run from the repo root:   OUT=/path/to/out bash scripts/gpu/shapes.sh
# CPU dry run (tiny shapes, a minute or two):   OUT=/tmp/x bash scripts/gpu/shapes.sh --cpu-smoke
# Everything goes under $OUT: $OUT/runs/ holds the run dirs (append-only points.jsonl: a re-run with the same $OUT
# resumes) and the report; $OUT/summary.txt and $OUT/shapes-runs.tar.gz (all of runs/) are what to fetch.
# One failing point or method never stops the rest; a capped sweep keeps every point it finished (falqon's
# points run first). Time caps (seconds, env): FAST_ACCUM_TIMEOUT_S (default 60; 0 skips that phase), SWEEP_TIMEOUT_S
# (default 390), TUNE_S (default 0: off; ~110 tunes the quantize kernels first, see below).
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output directory}"
mkdir -p "$OUT"
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
CLI=(python -m falqon_bench.cli)
RUNS="$OUT/runs"
mkdir -p "$RUNS"
FAST="$RUNS/fast-accum"
SUITE=${SHAPES_SUITE:-suites/shapes.toml}  # SHAPES_SUITE: another suite file (e.g. one without qlora_nf4 where bitsandbytes is missing)
FAST_SUITE="$RUNS/fast_accum.toml"

if [ "$SMOKE" = 1 ]; then
  # tiny shapes with odd ranks and token counts, the same methods and the same summary path
  SUITE="$RUNS/shapes_smoke.toml"
  cat > "$SUITE" <<'TOML'
name = "shapes-smoke"
description = "CPU dry run of scripts/gpu/shapes.sh: tiny layers, odd and aligned ranks and tokens"
device = "cpu"
[timing]
budget_ms = 20
warmup_ms = 5
min_samples = 3
profile = false
[defaults]
methods = ["falqon", "bf16_lora", "halo_lora", "fp8_base_lora", "qlora_nf4"]
compile = [false]
[[grid]]
layers = [{ name = "tiny.attn", K = 64, N = 64 }, { name = "tiny.kv", K = 64, N = 32 }]
ranks = [8, 16]
tokens = [77]
[[grid]]
layers = [{ name = "tiny.kv", K = 64, N = 32 }]
ranks = [24]
tokens = [2048]
[[grid]]
layers = [{ name = "tiny.attn", K = 64, N = 64 }]
ranks = [16]
tokens = [77]
methods = ["fp8_lora"]
TOML
  LAYERS='[{ name = "llama-7b.attn", K = 64, N = 64 }]'
  FAST_TOKENS=4096
  FAST_RANK=16
  DEVICE=cpu
else
  LAYERS='["llama-7b.attn", "llama-7b.up", "llama-7b.down"]'
  FAST_TOKENS=4096
  FAST_RANK=64
  DEVICE=cuda
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv || true
fi

cat > "$FAST_SUITE" <<TOML
name = "fast-accum"
description = "falqon forward GEMM with use_fast_accum on and off"
device = "$DEVICE"
[timing]
budget_ms = $([ "$SMOKE" = 1 ] && echo 20 || echo 200)
warmup_ms = $([ "$SMOKE" = 1 ] && echo 5 || echo 100)
min_samples = $([ "$SMOKE" = 1 ] && echo 3 || echo 30)
profile = false
[[grid]]
layers = $LAYERS
ranks = [$FAST_RANK]
tokens = [$FAST_TOKENS]
methods = ["falqon"]
options = [{ falqon = { fast_accum = true } }, { falqon = { fast_accum = false } }]
TOML

SWEEP="$RUNS/$(basename "$SUITE" .toml)"  # the run's id is its directory's name: the suite's (shapes, other-models, ...)

run_capped() {  # run_capped SECONDS SUITE RUN_DIR: resume when the dir exists; a timeout keeps what finished
  local cap=$1 suite=$2 dir=$3 resume=()
  if [ "$cap" -le 0 ]; then echo "=== $suite: skipped (cap $cap s)"; return 0; fi
  [ -f "$dir/points.jsonl" ] && resume=(--resume)
  echo "=== $(date -u +%T) run $suite -> $dir (cap ${cap}s)"
  timeout --signal=INT --kill-after=20 "$cap" "${CLI[@]}" run "$suite" --out "$dir" "${resume[@]}" 2>&1 \
    | grep -v -E "W[0-9]{4} |Enum subclass|_warn_once|Profiler clears" | tail -25 || echo "(run ended with status $?)"
}

# optional first phase (TUNE_S > 0): time the quantize kernels' launch configs on this GPU and run the sweep with the
# winners (FALQON_KERNEL_TABLE; each run's manifest records the table it used). Paste the printed TUNED block into
# falqon_core/kernels/quantize_configs.py to keep them.
if [ "${TUNE_S:-0}" -gt 0 ]; then
  echo "=== $(date -u +%T) tune the quantize kernels (budget ${TUNE_S}s)"
  tune_args=(--out "$RUNS/tune_quantize.json" --budget-s "$TUNE_S")
  [ "$SMOKE" = 1 ] && tune_args=(--cpu-smoke --out "$RUNS/tune_quantize.json")
  if timeout --kill-after=20 "$((TUNE_S + 60))" python scripts/gpu/tune_quantize.py "${tune_args[@]}" 2>&1 | tee "$RUNS/tune_quantize.txt" | tail -40 \
      && [ -f "$RUNS/tune_quantize.json" ]; then
    export FALQON_KERNEL_TABLE="$RUNS/tune_quantize.json"
    echo "=== sweep runs with FALQON_KERNEL_TABLE=$FALQON_KERNEL_TABLE"
  else
    echo "(tuning failed: the sweep runs with the committed table)"
  fi
fi

run_capped "${FAST_ACCUM_TIMEOUT_S:-60}" "$FAST_SUITE" "$FAST"
run_capped "${SWEEP_TIMEOUT_S:-390}" "$SUITE" "$SWEEP"

echo "=== $(date -u +%T) report"
"${CLI[@]}" report "$SWEEP" --out "$RUNS/report" 2>&1 | tail -3 || echo "(report failed)"
echo "=== $(date -u +%T) summary"
fast=(); [ -f "$FAST/points.jsonl" ] && fast=("$FAST")
python scripts/gpu/shapes_summary.py "$SWEEP" "${fast[@]}" 2>&1 | tee "$OUT/summary.txt" || echo "(summary failed)"
cp "$OUT/summary.txt" "$RUNS/" 2>/dev/null || true
tar -czf "$OUT/shapes-runs.tar.gz" -C "$OUT" runs
echo "=== $(date -u +%T) done: $OUT/shapes-runs.tar.gz"
