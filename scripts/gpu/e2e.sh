#!/usr/bin/env bash
# Whole-model fine-tuning on one H200 (issue #11): every method per execution mode, through `falqon-bench run`.
#
#   OUT=/tmp/out bash scripts/gpu/e2e.sh A        # llama-7b (32 layers, 2 x 2048 tokens, rank 16), eager, all methods
#   OUT=/tmp/out bash scripts/gpu/e2e.sh B        # the same in cuda_graph mode (whole step in one CUDA graph)
#   OUT=/tmp/out bash scripts/gpu/e2e.sh C        # the same with torch.compile: bf16_lora, fp8_base_lora, halo_lora, falqon
#   OUT=/tmp/out bash scripts/gpu/e2e.sh D        # llama-13b (40 layers) eager, all methods: does it fit, peak memory
#   OUT=/tmp/x bash scripts/gpu/e2e.sh --cpu-smoke A B C D   # tiny-llama on the CPU: checks the script, measures nothing
#
# Each part is sized for <= 9 minutes on an H200 and stops itself at 8.5 min (finished points are already written:
# `--resume` on the tarred run completes it). Writes $OUT/e2e-<part>.tar.gz (the run directory) and prints a table:
# method, mode, tokens/s, ratio to the best bf16_lora mode, step ms, GPU busy, peak GiB, convert s.
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the directory the results go to}"
mkdir -p "$OUT"

SMOKE=0
PARTS=()
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    A|B|C|D) PARTS+=("$arg") ;;
    *) echo "usage: bash scripts/gpu/e2e.sh [--cpu-smoke] A|B|C|D ..." >&2; exit 2 ;;
  esac
done
[ "${#PARTS[@]}" -gt 0 ] || { echo "usage: bash scripts/gpu/e2e.sh [--cpu-smoke] A|B|C|D ..." >&2; exit 2; }

ALL='["bf16_lora", "qlora_nf4", "fp8_lora", "fp8_base_lora", "fp6_lora", "halo_lora", "falqon"]'
COMPILED='["bf16_lora", "fp8_base_lora", "halo_lora", "falqon"]'
PART_LIMIT_S=510

write_suite() {  # part model layers modes methods steps warmup profile -> suite path
  local part=$1 model=$2 layers=$3 modes=$4 methods=$5 steps=$6 warmup=$7 profile=$8
  local device=cuda seq=2048 batch=2
  if [ "$SMOKE" = 1 ]; then
    device=cpu model=tiny-llama layers=2 seq=32 steps=3 warmup=1 profile=0
    modes=${modes/\"compile\"/\"eager\"}  # inductor on a shared CPU takes minutes: the smoke checks the plumbing
  fi
  local path="$OUT/e2e_${part}.toml"
  cat > "$path" <<TOML
# issue #11 part $part (written by scripts/gpu/e2e.sh)
kind = "e2e"
name = "e2e-$part"
description = '$model $layers layers, $batch x $seq tokens/step, rank 16, modes $modes'
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
methods = $methods
modes = $modes
TOML
  echo "$path"
}

run_part() {
  local part=$1 suite
  case "$part" in
    A) suite=$(write_suite A llama-7b 32 '["eager"]' "$ALL" 16 6 3) ;;
    B) suite=$(write_suite B llama-7b 32 '["cuda_graph"]' "$ALL" 16 6 3) ;;
    C) suite=$(write_suite C llama-7b 32 '["compile"]' "$COMPILED" 16 6 3) ;;
    D) suite=$(write_suite D llama-13b 40 '["eager"]' "$ALL" 8 3 1) ;;
  esac
  local run_dir="$OUT/e2e-$part"
  echo "=== part $part: $(grep '^description' "$suite")"
  local t0=$SECONDS rc=0
  timeout --signal=INT --kill-after=30 "$PART_LIMIT_S" \
    python -m falqon_bench.cli run "$suite" --out "$run_dir" --point-timeout-s 300 || rc=$?
  echo "part $part: exit $rc after $((SECONDS - t0)) s"
  cp "$suite" "$run_dir/" 2>/dev/null || true
  tar -czf "$OUT/e2e-$part.tar.gz" -C "$OUT" "e2e-$part" && rm -rf "$run_dir" "$suite"
}

for part in "${PARTS[@]}"; do
  run_part "$part" || echo "part $part failed; continuing"
done

python - "$OUT" "${PARTS[@]}" <<'PY'
import json, sys, tarfile
from falqon_bench.readers.figures.e2e import e2e_rows, summary_table

out, parts = sys.argv[1], sys.argv[2:]
rows = []
for part in parts:
    try:
        with tarfile.open(f"{out}/e2e-{part}.tar.gz") as tar:
            member = tar.extractfile(f"e2e-{part}/points.jsonl")
            rows += [json.loads(line) for line in member.read().decode().splitlines() if line.strip()]
    except (OSError, KeyError, tarfile.TarError) as e:
        print(f"part {part}: no results ({e})")
f = lambda v, spec: "-" if v is None else format(v, spec)
print(f"\n{'method':14} {'mode':10} {'tokens/s':>9} {'vs bf16':>8} {'step ms':>8} {'busy':>5} {'peak GiB':>8} {'convert s':>9}  model")
for model in dict.fromkeys(r["layer"] for r in e2e_rows(rows)):
    mine = [r for r in e2e_rows(rows) if r["layer"] == model]
    for t in summary_table(mine):
        if t["status"] != "ok":
            print(f"{t['method']:14} {t['mode']:10} error: {str(t['error'])[:90]}  {model}")
            continue
        print(f"{t['method']:14} {t['mode']:10} {f(t['tokens_per_s'], ',.0f'):>9} {f(t['vs_bf16_best'], '.2f'):>8} "
              f"{f(t['wall_ms'], '.1f'):>8} {f(t['gpu_busy'], '.0%'):>5} {f(t['peak_gib'], '.1f'):>8} {f(t['convert_s'], '.1f'):>9}  {model}")
PY
