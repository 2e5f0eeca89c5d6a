#!/usr/bin/env bash
# falqon's worst classes after the kernel levers of issue 13 (tl.dot merge, Triton row select, fused
# quantize + transpose), on one H200: first the GPU tests of those kernels and of the falqon layer
# (bit-exactness against their references at llama shapes, CUDA-graph capture, fp64 bounds; ~1 min,
# capped), then suites/cliffs.toml (142 points, ~4 min, capped), then per point falqon ms, best other ms,
# their ratio, % of floor, and falqon before (results/shapes-h200, the committed run of the code before the
# levers) next to now. At most 6 minutes.
# Run from the repo root:   OUT=/path/to/out bash scripts/gpu/cliffs.sh
# CPU dry run (tiny shapes, 2-3 minutes on 2 cores):   OUT=/tmp/x bash scripts/gpu/cliffs.sh --cpu-smoke
# Under $OUT, three files: summary.txt (the table), gpu-tests.txt, cliffs-runs.tar.gz (the run dir, with both).
# The run dir itself is under $CLIFFS_WORK (default /tmp/cliffs-work; append-only points.jsonl, so a re-run
# with the same $CLIFFS_WORK resumes). One failing point, method or stage never stops the rest; a capped
# sweep keeps every point it finished (falqon's points run first).
# Time caps (seconds, env): TESTS_TIMEOUT_S (default 90), SWEEP_TIMEOUT_S (default 250).
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output directory}"
mkdir -p "$OUT"
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
CLI=(python -m falqon_bench.cli)
WORK="${CLIFFS_WORK:-/tmp/cliffs-work}"
RUNS="$WORK/runs"
mkdir -p "$RUNS"
SWEEP="$RUNS/cliffs"
SUITE=suites/cliffs.toml
BEFORE=results/shapes-h200

if [ "$SMOKE" = 1 ]; then
  # tiny layers, odd and aligned ranks and tokens, the same methods, stages and summary
  SUITE="$RUNS/cliffs_smoke.toml"
  cat > "$SUITE" <<'TOML'
name = "cliffs-smoke"
description = "CPU dry run of scripts/gpu/cliffs.sh: tiny layers, odd and aligned ranks and tokens"
device = "cpu"
[timing]
budget_ms = 20
warmup_ms = 5
min_samples = 3
profile = false
[defaults]
methods = ["falqon", "bf16_lora", "halo_lora"]
compile = [false]
[[grid]]
layers = [{ name = "tiny.attn", K = 64, N = 64 }, { name = "tiny.kv", K = 64, N = 32 }]
ranks = [24]
tokens = [77, 512]
TOML
else
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv || true
fi

echo "=== $(date -u +%T) GPU tests of the levers' kernels (cap ${TESTS_TIMEOUT_S:-90}s)"
timeout --kill-after=10 "${TESTS_TIMEOUT_S:-90}" python -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_kernels_topk.py tests/test_kernels_quantize_transpose.py tests/test_kernels_proxy_update.py \
  tests/test_falqon.py tests/test_falqon_padding.py \
  > "$OUT/gpu-tests.txt" 2>&1 || echo "(tests ended with status $?)"
tail -5 "$OUT/gpu-tests.txt" || true

resume=()
[ -f "$SWEEP/points.jsonl" ] && resume=(--resume)
echo "=== $(date -u +%T) run $SUITE -> $SWEEP (cap ${SWEEP_TIMEOUT_S:-250}s)"
timeout --signal=INT --kill-after=20 "${SWEEP_TIMEOUT_S:-250}" "${CLI[@]}" run "$SUITE" --out "$SWEEP" "${resume[@]}" 2>&1 \
  | grep -v -E "W[0-9]{4} |Enum subclass|_warn_once|Profiler clears" | tail -15 || echo "(run ended with status $?)"

echo "=== $(date -u +%T) summary (before: $BEFORE)"
python scripts/gpu/cliffs_summary.py "$SWEEP" "$BEFORE" > "$OUT/summary.txt" 2>&1 || echo "(summary failed)"
cp "$OUT/summary.txt" "$OUT/gpu-tests.txt" "$RUNS/" 2>/dev/null || true
tar -czf "$OUT/cliffs-runs.tar.gz" -C "$WORK" runs
cat "$OUT/summary.txt"
echo "=== $(date -u +%T) done: $OUT/cliffs-runs.tar.gz"
