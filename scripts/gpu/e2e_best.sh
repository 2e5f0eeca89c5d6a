#!/usr/bin/env bash
# Every method at its best execution mode on one H200 (issue #11): llama-7b, all 32 layers, 2 x 2048 tokens per
# step, rank 16, AdamW; with the step's kernel time by class and its floor (falqon_bench.measure.e2e_floor).
#
#   OUT=/tmp/out bash scripts/gpu/e2e_best.sh               # on the H200, <= 9 min, stops itself at 8.5 min
#   OUT=/tmp/x bash scripts/gpu/e2e_best.sh --cpu-smoke     # tiny-llama on the CPU, every mode as eager: checks the
#                                                           # script end to end, measures nothing
#
# Two runs (results directories): llama-7b with falqon and bf16_lora compile_cuda_graph, halo_lora and qlora_nf4
# cuda_graph and compile_cuda_graph, fp8_lora eager (in that order, each method in its own worker); then halo_lora on
# llama-13b (40 layers, the one method session 2's llama-13b run lacks). One failing point is one error row; a
# point not reached before the deadline is listed as such. Each point: 10 steps (4 eager warm-up, then capture;
# 6 timed) and 2 profiled steps. Writes $OUT/e2e-best.tar.gz (both run directories) and prints
# two tables: tokens/s per method and mode, and GPU ms per kernel class with the floor.
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the directory the results go to}"
mkdir -p "$OUT"

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    *) echo "usage: OUT=DIR bash scripts/gpu/e2e_best.sh [--cpu-smoke]" >&2; exit 2 ;;
  esac
done

LIMIT_S=${E2E_BEST_LIMIT_S:-510}   # the whole script; the tables after it take a few seconds
POINT_TIMEOUT_S=240
RESERVE_13B_S=110  # kept back from the llama-7b run for halo_lora on llama-13b
# llama-7b: every method at its best modes, one run (one results directory); the methods run in this order, each in
# its own worker, its modes in the order given. Left out since session 3's run: falqon cuda_graph, bf16_lora
# cuda_graph (both slower than their compile_cuda_graph points in results/fast-stacks-e2e-h200) and the per-layer
# proxy-update A/B (results/e2e-llama7b-falqon-batched-h200).
METHODS='"falqon", "bf16_lora", "halo_lora", "qlora_nf4", "fp8_lora"'
MODES_BY_METHOD='falqon = ["compile_cuda_graph"]
bf16_lora = ["compile_cuda_graph"]
halo_lora = ["cuda_graph", "compile_cuda_graph"]
qlora_nf4 = ["cuda_graph", "compile_cuda_graph"]
fp8_lora = ["eager"]'
ROOT="$OUT/e2e-best"
mkdir -p "$ROOT"

write_suite() {  # name model layers methods(TOML list items) modes_by_method(TOML lines) -> suite path
  local name=$1 model=$2 layers=$3 methods=$4 by_method=$5
  local device=cuda seq=2048 batch=2 steps=10 warmup=4 profile=2
  if [ "$SMOKE" = 1 ]; then
    device=cpu model=tiny-llama layers=2 seq=32 steps=3 warmup=1 profile=0
    # CUDA graphs need a GPU and inductor takes minutes on a shared CPU: the smoke checks the plumbing, eager only
    by_method=$(sed -E 's/= \[.*\]/= ["eager"]/' <<< "$by_method")
  fi
  local path="$ROOT/$name.toml"
  cat > "$path" <<TOML
# issue #11: every method at its best modes (written by scripts/gpu/e2e_best.sh)
kind = "e2e"
name = "$name"
description = '$model $layers layers, $batch x $seq tokens/step, rank 16, each method at its best modes'
device = "$device"
model = "$model"
layers = $layers
seq_len = $seq
batch = $batch
steps = $steps
warmup_steps = $warmup
profile_steps = $profile
rank = 16
lr = 1e-4
methods = [$methods]
modes = ["eager"]

[modes_by_method]
$by_method
TOML
  echo "$path"
}

run_capped() {  # run_capped NAME SUITE SECONDS: a timeout (SIGINT) keeps every finished point
  local name=$1 suite=$2 cap=$3 rc=0
  echo "=== $name (cap $cap s)"
  timeout --signal=INT --kill-after=20 "$cap" \
    python -m falqon_bench.cli run "$suite" --out "$ROOT/$name" --point-timeout-s "$POINT_TIMEOUT_S" || rc=$?
  echo "$name: exit $rc after $((SECONDS - START)) s in all"
}

START=$SECONDS
if [ "$SMOKE" = 0 ]; then  # the batched proxy update on this GPU: bit-identical to per-layer, capturable (~30 s)
  timeout 90 python -m pytest -q -m gpu tests/test_proxy_update_batched.py 2>&1 | tail -3 | tee "$ROOT/gpu_tests.txt" || true
fi
suite=$(write_suite e2e-best-llama7b llama-7b 32 "$METHODS" "$MODES_BY_METHOD")
run_capped e2e-best-llama7b "$suite" $((LIMIT_S - RESERVE_13B_S - (SECONDS - START)))
left=$((LIMIT_S - (SECONDS - START)))
suite=$(write_suite e2e-best-llama13b-halo llama-13b 40 '"halo_lora"' 'halo_lora = ["cuda_graph"]')
if [ "$left" -ge 45 ]; then
  run_capped e2e-best-llama13b-halo "$suite" "$left"
else
  echo "=== halo_lora on llama-13b: not reached (${left} s left of ${LIMIT_S} s)" | tee -a "$ROOT/not_reached.txt"
fi

tar -czf "$OUT/e2e-best.tar.gz" -C "$OUT" e2e-best

python - "$ROOT" <<'PY'
import json, sys
from pathlib import Path
from falqon_bench.readers.figures.e2e import e2e_rows, floor_table, summary_table

root = Path(sys.argv[1])
rows = []
for points in sorted(root.glob("*/points.jsonl")):
    rows += [json.loads(line) for line in points.read_text().splitlines() if line.strip()]
rows = e2e_rows(rows)
others = [r for r in rows if r.get("layer") not in (None, "llama-7b", "tiny-llama")]  # e.g. halo_lora on llama-13b
rows = [r for r in rows if r not in others]
f = lambda v, spec: "-" if v is None else format(v, spec)
print(f"\n{'method':12} {'mode':19} {'tokens/s':>9} {'vs bf16':>7} {'step ms':>8} {'GPU ms':>7} {'busy':>5} {'launch':>6} {'peak GiB':>8} {'conv s':>6}")
by_id = {(r["method"], r.get("mode")): r for r in rows}
for t in summary_table(rows):
    r = by_id.get((t["method"], t["mode"]), {})
    if t["status"] != "ok":
        print(f"{t['method']:12} {str(t['mode']):19} error: {str(t['error'])[:100]}")
        continue
    print(f"{t['method']:12} {t['mode']:19} {f(t['tokens_per_s'], ',.0f'):>9} {f(t['vs_bf16_best'], '.2f'):>7} "
          f"{f(t['wall_ms'], '.1f'):>8} {f(r.get('gpu_ms'), '.1f'):>7} {f(t['gpu_busy'], '.0%'):>5} "
          f"{f(r.get('kernel_launches'), '.0f'):>6} {f(t['peak_gib'], '.1f'):>8} {f(t['convert_s'], '.1f'):>6}")
table = floor_table(rows)
print("\nGPU ms per step by kernel class, and the floor (linears + LM head at the measured peaks + measured rest):")
print(table or "(no profiled rows: CPU smoke, or every point failed)")
for r in others:
    print(f"\n{r.get('layer')}: {r['method']} {r.get('mode')}: {r.get('status')}, {f(r.get('tokens_per_s'), ',.0f')} tokens/s, "
          f"peak {f((r.get('peak_mem_bytes') or 0) / 2**30 or None, '.1f')} GiB {str(r.get('error') or '')[:100]}")
missing = root / "not_reached.txt"
if missing.exists():
    print(missing.read_text())
PY
