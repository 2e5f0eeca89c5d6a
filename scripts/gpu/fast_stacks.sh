#!/usr/bin/env bash
# Liger-kernel and Unsloth on the H200 (about 3 minutes): liger's patches apply and keep the loss and adapter
# gradients of bf16_lora and falqon on llama-7b's shapes with 2 layers (2 x 2048 tokens, rank 16, eager), and
# what liger does to their step time; the Unsloth baselines run where Unsloth is installed.
#
#   OUT=/tmp/out bash scripts/gpu/fast_stacks.sh               # on the GPU machine, from the repo root
#   OUT=/tmp/x bash scripts/gpu/fast_stacks.sh --cpu-smoke     # tiny-llama on CPU: the plumbing only
#
# Wheels: liger-kernel (.whl/liger_kernel-0.8.5-py3-none-any.whl) is installed from .whl/ when it is not
# importable. Unsloth is optional: when .whl/ holds unsloth-*.whl, it is installed with --no-deps together with
# the wheels it imports on its GPU path (unsloth_zoo, trl, datasets, multiprocess, dill, xxhash, httpx),
# all from .whl/.
# Output: $OUT/fast_stacks.tar.gz (points.jsonl, env.json, log.txt) and the summary table on stdout.
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output directory}"

smoke=()
if [[ "${1:-}" == "--cpu-smoke" || "${FAST_STACKS_CPU_SMOKE:-0}" == "1" ]]; then
    smoke=(--cpu-smoke)
    export TRITON_INTERPRET=1  # falqon's Triton kernels on CPU
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
run_dir="$OUT/fast_stacks"
mkdir -p "$run_dir"
rm -f "$run_dir/points.jsonl"

install_wheels() {  # install_wheels GLOB...: pip install --no-deps the wheels in .whl/ that match
    local wheels=()
    for pattern in "$@"; do
        for w in .whl/$pattern; do [[ -f "$w" ]] && wheels+=("$w"); done
    done
    if ((${#wheels[@]})); then
        python -m pip install --quiet --no-deps --no-index "${wheels[@]}" || echo "pip install of ${wheels[*]} failed"
    fi
}

if ! python -c "import liger_kernel" 2>/dev/null; then
    install_wheels 'liger_kernel-*.whl'
fi
if ! python -c "import unsloth" 2>/dev/null && compgen -G ".whl/unsloth-*.whl" >/dev/null; then
    install_wheels 'unsloth-*.whl' 'unsloth_zoo-*.whl' 'trl-*.whl' 'datasets-*.whl' 'multiprocess-*.whl' \
        'dill-*.whl' 'xxhash-*.whl' 'httpx-*.whl'
fi

status=0
python scripts/gpu/fast_stacks_check.py --out "$run_dir" "${smoke[@]}" 2>&1 | tee "$run_dir/log.txt" || status=$?
tar -czf "$OUT/fast_stacks.tar.gz" -C "$OUT" fast_stacks
echo "wrote $OUT/fast_stacks.tar.gz (exit status of the check: $status)"
exit "$status"
