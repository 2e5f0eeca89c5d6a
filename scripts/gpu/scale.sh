#!/usr/bin/env bash
# Many GPUs on one host (issue #16): weak scaling, the largest model each method fine-tunes, the sweep over all GPUs.
#
#   OUT=/tmp/out bash scripts/gpu/scale.sh W     # weak scaling: llama-7b (32 layers), 2 x 2048 tokens per GPU per step,
#                                                #   r 16, DDP under torchrun on 1, 2, 4, 8 GPUs (up to the GPUs present):
#                                                #   bf16_lora, qlora_nf4, halo_lora, falqon; eager            ~7 min
#   OUT=/tmp/out bash scripts/gpu/scale.sh L1    # largest model on 1 GPU: FSDP2 (parallel = "fsdp", built layer by
#                                                #   layer), 1 x 1024 tokens, llama-70b first, then llama-13b and
#                                                #   llama-7b only for the methods that did not fit the larger one ~8 min
#   OUT=/tmp/out bash scripts/gpu/scale.sh L8    # the same on 8 GPUs (torchrun --nproc-per-node 8)                ~8 min
#   OUT=/tmp/out bash scripts/gpu/scale.sh S     # the shapes sweep with `falqon-bench run --gpus all`, merged, and
#                                                #   shard 1 of it again on one GPU: compared point for point  ~4 min
#   OUT=/tmp/x bash scripts/gpu/scale.sh --cpu-smoke W L1 L8 S   # tiny-llama, gloo, 2 CPU processes: checks the script
#
# Each part stops itself at 9 min (finished points are already written: rerun the part's torchrun with --resume on
# the untarred directory to complete it) and writes $OUT/scale-<part>.tar.gz. Last, a summary: tokens/s per GPU
# per GPU count and the efficiency at the most GPUs (the issue's bar: >= 90% of 1 GPU), the largest model per method
# and GPU count with peak memory, and the sweep's per-point ratio (all GPUs merged / one GPU).
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the directory the results go to}"
mkdir -p "$OUT"

USAGE="usage: bash scripts/gpu/scale.sh [--cpu-smoke] W|L1|L8|S ..."
SMOKE=0
PARTS=()
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    W|L1|L8|S) PARTS+=("$arg") ;;
    *) echo "$USAGE" >&2; exit 2 ;;
  esac
done
[ "${#PARTS[@]}" -gt 0 ] || { echo "$USAGE" >&2; exit 2; }

PART_LIMIT_S=540
WEAK_METHODS='["bf16_lora", "qlora_nf4", "halo_lora", "falqon"]'
LARGEST_METHODS='["falqon", "qlora_nf4", "bf16_lora", "halo_lora"]'  # falqon first: a part cut short keeps it
if [ "$SMOKE" = 1 ]; then
  WEAK_METHODS='["bf16_lora", "falqon"]'  # the CUDA-only methods would only be error rows on the CPU
  LARGEST_METHODS=$WEAK_METHODS
  GPUS=2  # two CPU processes with gloo stand in for the GPUs
  export OMP_NUM_THREADS=1
else
  GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
fi
echo "scale.sh: parts ${PARTS[*]}, $GPUS GPU(s)$([ "$SMOKE" = 1 ] && echo ' (cpu smoke: CPU processes)')"

write_suite() {  # path name model layers seq batch steps warmup parallel methods
  local path=$1 name=$2 model=$3 layers=$4 seq=$5 batch=$6 steps=$7 warmup=$8 parallel=$9 methods=${10}
  local device=cuda
  if [ "$SMOKE" = 1 ]; then device=cpu model=tiny-llama layers=2 seq=32 batch=2 steps=3 warmup=1; fi
  cat > "$path" <<TOML
# issue #16 (written by scripts/gpu/scale.sh)
kind = "e2e"
name = "$name"
description = '$model $layers layers, $batch x $seq tokens per GPU per step, rank 16, $parallel'
device = "$device"
model = "$model"
layers = $layers
seq_len = $seq
batch = $batch
steps = $steps
warmup_steps = $warmup
profile_steps = 0
rank = 16
lr = 1e-4
methods = $methods
modes = ["eager"]
parallel = "$parallel"
TOML
}

launch() {  # nproc suite out timeout_s: one torchrun of the e2e suite; never fails the script
  local nproc=$1 suite=$2 out=$3 limit=$4 rc=0 t0=$SECONDS
  timeout --signal=INT --kill-after=30 "$limit" \
    python -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m falqon_bench.measure.e2e "$suite" --out "$out" \
    || rc=$?
  echo "  torchrun x$nproc $(basename "$suite" .toml): exit $rc after $((SECONDS - t0)) s"
}

part_weak() {  # W: DDP weak scaling of llama-7b on 1, 2, 4, 8 GPUs
  local dir=$1 deadline=$((SECONDS + PART_LIMIT_S))
  for world in 1 2 4 8; do
    [ "$world" -le "$GPUS" ] || { echo "  world $world: skipped ($GPUS GPU(s) here)"; continue; }
    local left=$((deadline - SECONDS))
    [ "$left" -gt 60 ] || { echo "  world $world: skipped (part time limit)"; continue; }
    write_suite "$dir/weak-$world.toml" "scale-weak" llama-7b 32 2048 2 8 3 ddp "$WEAK_METHODS"
    launch "$world" "$dir/weak-$world.toml" "$dir/world$world" "$left"
  done
}

methods_without_ok() {  # run_dir methods_json -> methods_json of those with no ok row in run_dir
  python - "$1" "$2" <<'PY'
import json, sys
from pathlib import Path
run, methods = Path(sys.argv[1]), json.loads(sys.argv[2])
ok = set()
if (run / "points.jsonl").exists():
    ok = {r["method"] for r in map(json.loads, (run / "points.jsonl").read_text().splitlines()) if r.get("status") == "ok"}
print(json.dumps([m for m in methods if m not in ok]))
PY
}

part_largest() {  # L1 / L8: FSDP2, largest model first; smaller models only for the methods that did not fit
  local dir=$1 world=$2 deadline=$((SECONDS + PART_LIMIT_S)) methods=$LARGEST_METHODS
  [ "$world" -le "$GPUS" ] || { echo "  $world GPUs: skipped ($GPUS GPU(s) here)"; return 0; }
  for model in llama-70b llama-13b llama-7b; do
    [ "$methods" != "[]" ] || break
    local left=$((deadline - SECONDS)) layers
    [ "$left" -gt 60 ] || { echo "  $model: skipped (part time limit)"; break; }
    case "$model" in llama-70b) layers=80 ;; llama-13b) layers=40 ;; *) layers=32 ;; esac
    write_suite "$dir/$model.toml" "scale-largest" "$model" "$layers" 1024 1 4 1 fsdp "$methods"
    launch "$world" "$dir/$model.toml" "$dir/$model" "$left"
    methods=$(methods_without_ok "$dir/$model" "$methods")
  done
}

part_sweep() {  # S: the shapes sweep on every GPU (one shard each, merged) and shard 1 of it alone on one GPU
  local dir=$1 suite=suites/shapes.toml gpus=all shard="1/$GPUS"
  if [ "$SMOKE" = 1 ]; then
    suite=suites/smoke.toml gpus=1 shard=1/2  # no GPU here: --gpus is refused (exit 2), the single run still runs
  fi
  local t0=$SECONDS rc=0
  timeout --signal=INT --kill-after=30 $((PART_LIMIT_S / 2)) \
    python -m falqon_bench.cli run "$suite" --gpus "$gpus" --out "$dir/all-gpus" --point-timeout-s 120 || rc=$?
  echo "  run --gpus $gpus: exit $rc after $((SECONDS - t0)) s"
  t0=$SECONDS rc=0
  CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} timeout --signal=INT --kill-after=30 $((PART_LIMIT_S / 2)) \
    python -m falqon_bench.cli run "$suite" --shard "$shard" --out "$dir/one-gpu" --point-timeout-s 120 || rc=$?
  echo "  run --shard $shard on one GPU: exit $rc after $((SECONDS - t0)) s"
}

run_part() {
  local part=$1 dir="$OUT/scale-$1"
  mkdir -p "$dir"
  echo "=== part $part"
  case "$part" in
    W) part_weak "$dir" ;;
    L1) part_largest "$dir" 1 ;;
    L8) part_largest "$dir" $([ "$SMOKE" = 1 ] && echo 2 || echo 8) ;;
    S) part_sweep "$dir" ;;
  esac
  tar -czf "$OUT/scale-$part.tar.gz" -C "$OUT" "scale-$part" && rm -rf "$dir"
}

for part in "${PARTS[@]}"; do
  run_part "$part" || echo "part $part failed; continuing"
done

python - "$OUT" "${PARTS[@]}" <<'PY'
import json, statistics, sys, tarfile
from falqon_bench.readers.figures.scaling import largest_models, scaling_efficiency, scaling_series

out, parts = sys.argv[1], sys.argv[2:]
runs: dict[str, list[dict]] = {}
for part in parts:
    try:
        with tarfile.open(f"{out}/scale-{part}.tar.gz") as tar:
            for m in tar.getmembers():
                if m.name.endswith("/points.jsonl") and "/shards/" not in m.name:
                    text = tar.extractfile(m).read().decode()
                    runs[m.name] = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, tarfile.TarError) as e:
        print(f"part {part}: no results ({e})")
rows = [r for name, rs in runs.items() for r in rs]
e2e = [r for r in rows if r.get("kind") == "e2e"]
for r in e2e:
    if r.get("status") != "ok":
        print(f"error: {r['method']} {r['layer']} x{r.get('world_size')}: {str(r.get('error'))[:110]}")
series = scaling_series([r for name, rs in runs.items() if "/world" in name for r in rs])
if series:
    worlds = sorted({w for s in series.values() for w in s})
    print("\nweak scaling: tokens/s per GPU (llama-7b, 4096 tokens per GPU per step, r 16, DDP, eager)")
    print(f"{'method':12}" + "".join(f"{str(w) + ' GPU':>10}" for w in worlds) + f"{'efficiency':>12}")
    for (model, method, mode, parallel), s in series.items():
        eff = scaling_efficiency(s)[max(s)]
        print(f"{method:12}" + "".join(f"{s[w]:>10,.0f}" if w in s else f"{'-':>10}" for w in worlds)
              + f"{eff:>11.0%}{'  < 90%' if eff < 0.9 else ''}")
largest = [r for name, rs in runs.items() if "scale-L" in name for r in rs]
if largest:
    print("\nlargest model each method fine-tunes (FSDP2, 1 x 1024 tokens per GPU, r 16)")
    for g in largest_models(largest):
        best = g["best"]
        tried = ", ".join(f"{a['model']} {a['outcome']}" for a in g["tried"])
        what = f"{best['model']} ({best['peak_gib']:.1f} GiB peak)" if best and best["peak_gib"] else (best or {}).get("model", "none")
        print(f"{g['method']:12} {g['gpus']} GPU(s): {what:32} tried: {tried}")
merged = next((rs for name, rs in runs.items() if name.endswith("all-gpus/points.jsonl")), None)
single = next((rs for name, rs in runs.items() if name.endswith("one-gpu/points.jsonl")), None)
if merged and single:
    metric = "gpu_ms" if any(r.get("gpu_ms") for r in single) else "wall_ms"
    by_id = {r["point_id"]: r for r in merged if r.get("status") == "ok"}
    ratios = [by_id[r["point_id"]][metric] / r[metric] for r in single
              if r.get("status") == "ok" and r.get(metric) and r["point_id"] in by_id and by_id[r["point_id"]].get(metric)]
    print(f"\nsweep: {len(merged)} points merged from all GPUs; {len(single)} of them again on one GPU")
    if ratios:
        near = sum(abs(x - 1) <= 0.05 for x in ratios) / len(ratios)
        print(f"{metric} all-GPUs / one-GPU per point: median {statistics.median(ratios):.3f}, "
              f"min {min(ratios):.3f}, max {max(ratios):.3f}, within 5%: {near:.0%} of {len(ratios)}")
PY
