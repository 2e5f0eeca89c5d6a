#!/usr/bin/env bash
# The fastest stacks end to end on one H200 (issue #18): llama-7b, all 32 layers, 2 x 2048 tokens per step, rank 16,
# each method at its best mode of the last H200 runs, with and without liger-kernel, and the Unsloth baselines.
#
#   OUT=/tmp/out bash scripts/gpu/fast_stacks_e2e.sh                # on the GPU machine, from the repo root (<= 9 min)
#   OUT=/tmp/x bash scripts/gpu/fast_stacks_e2e.sh --cpu-smoke      # tiny-llama on the CPU: the plumbing only
#   RESUME_FROM=old/fast_stacks_e2e.tar.gz OUT=/tmp/out bash scripts/gpu/fast_stacks_e2e.sh   # finish a stopped run
#   SUITE=suites/fast-stacks-rest.toml OUT=/tmp/out bash scripts/gpu/fast_stacks_e2e.sh   # the methods the first run left out
#
# One e2e suite, suites/fast-stacks.toml, through `falqon-bench run` (a worker process per method, so importing
# Unsloth patches nothing else):
#   falqon     compile_cuda_graph, cuda_graph, eager   liger false / true (liger in a CUDA graph is recorded "unsupported": its fused
#                                    loss calls .item(); so liger runs in eager, next to eager without it)
#   bf16_lora  compile_cuda_graph, compile   liger false / true (liger's kernels run inside the compiled model)
#   unsloth_lora, unsloth_qlora  eager  (liger true: "unsupported", Unsloth fuses the same parts itself)
#   halo_lora, qlora_nf4  cuda_graph, eager  liger false / true, as falqon
# 8 steps, 3 of them warm-up, 1 profiled. Time, from results/e2e-llama7b-h200 and -compile-h200 (duration_s): ~15-25 s
# per point in cuda_graph/eager, ~125 s per compiled bf16_lora point, Unsloth ~60-90 s per point (save + load of the
# 13.5 GB model, its import), ~8 s per worker start: about 8-9 minutes. The run stops itself after LIMIT_S (500 s, setup included)
# and a point after 240 s; finished points are kept (RESUME_FROM completes the rest). Methods run in the order of
# `methods` below: the ones that decide falqon's speedup over the fastest stack first, halo_lora and qlora_nf4 last.
#
# Unsloth: the wheels in .whlunsloth/ (unsloth, unsloth_zoo, trl, datasets, multiprocess, dill; carried by the lead)
# are installed with --no-deps into $UNSLOTH_SITE, appended to PYTHONPATH; the image has the rest of what Unsloth
# imports on its training path. Without them the Unsloth points are "unsupported: unsloth is not installed".
# Output: $OUT/fast_stacks_e2e.tar.gz (the run directory: points.jsonl, manifest.json, worker.log, the suite, pip.txt)
# and the summary table on stdout (tokens/s, peak GiB, falqon's speedup over the fastest of all).
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the directory the results go to}"
mkdir -p "$OUT"

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    *) echo "usage: bash scripts/gpu/fast_stacks_e2e.sh [--cpu-smoke]" >&2; exit 2 ;;
  esac
done
[ "${FAST_STACKS_E2E_CPU_SMOKE:-0}" = 1 ] && SMOKE=1
LIMIT_S=${LIMIT_S:-500}
UNSLOTH_SITE=${UNSLOTH_SITE:-/tmp/site-unsloth}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export UNSLOTH_COMPILE_LOCATION=${UNSLOTH_COMPILE_LOCATION:-/tmp/falqon-unsloth-compiled}  # shared by both workers
run_dir="$OUT/fast-stacks-e2e"
t_start=$SECONDS

# --- Unsloth's wheels (a failure here only makes the Unsloth points "unsupported")
has_module() { python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
if ! has_module unsloth && compgen -G ".whlunsloth/*.whl" >/dev/null; then
  if python -m pip install --quiet --no-deps --no-index --target "$UNSLOTH_SITE" .whlunsloth/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$UNSLOTH_SITE"  # appended: never shadows the image's own packages
  else
    echo "pip install of .whlunsloth/*.whl failed: the Unsloth points will say why they cannot run"
  fi
fi
# Unsloth's baselines save the random-init model for its loader: in memory (/dev/shm) when it has room for 7B
if [ "$SMOKE" = 0 ] && [ "$(df --output=avail -BG /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)" -ge 40 ] 2>/dev/null; then
  export TMPDIR=/dev/shm/falqon-tmp && mkdir -p "$TMPDIR"
fi
echo "install and setup: $((SECONDS - t_start)) s; TMPDIR=${TMPDIR:-/tmp}"

# --- the suite: suites/fast-stacks.toml; the CPU smoke shrinks it to tiny-llama and a few steps
suite="$OUT/fast_stacks_e2e.toml"
cp "${SUITE:-suites/fast-stacks.toml}" "$suite"
if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1  # falqon's Triton kernels on the CPU
  # inductor on a shared CPU takes minutes: the smoke runs bf16_lora eager (it checks the plumbing, not the speed)
  sed -i -e 's/^device = .*/device = "cpu"/' -e 's/^model = .*/model = "tiny-llama"/' -e 's/^layers = .*/layers = 2/' \
    -e 's/^seq_len = .*/seq_len = 32/' -e 's/^steps = .*/steps = 3/' -e 's/^warmup_steps = .*/warmup_steps = 1/' \
    -e 's/^profile_steps = .*/profile_steps = 0/' -e 's/^bf16_lora = \[.*\]/bf16_lora = ["eager"]/' "$suite"
fi

resume=()
if [ -n "${RESUME_FROM:-}" ]; then
  tar -xzf "$RESUME_FROM" -C "$OUT" && resume=(--resume)
fi

# --- the run (stops itself; finished points are already in points.jsonl)
rc=0
left=$((LIMIT_S - (SECONDS - t_start)))
timeout --signal=INT --kill-after=30 "$left" \
  python -m falqon_bench.cli run "$suite" --out "$run_dir" --point-timeout-s 240 "${resume[@]}" || rc=$?
echo "run: exit $rc after $((SECONDS - t_start)) s in all (124: stopped at the time limit)"

mkdir -p "$run_dir"
cp "$suite" "$run_dir/" 2>/dev/null || true
python -m pip list 2>/dev/null | grep -iE "^(unsloth|unsloth.zoo|liger.kernel|trl|datasets|transformers|peft|torch|triton|bitsandbytes|torchao) " \
  > "$run_dir/pip.txt" || true
tar -czf "$OUT/fast_stacks_e2e.tar.gz" -C "$OUT" fast-stacks-e2e
echo "wrote $OUT/fast_stacks_e2e.tar.gz"
echo
python scripts/gpu/fast_stacks_e2e_summary.py "$run_dir" || true
rm -rf "$run_dir" "$suite"
