#!/usr/bin/env bash
# Does it still learn, and at what cost? On one H200 (up to ~10 min with every phase, each under its own time limit;
# T_ACC=0 for the cost alone, ~4 min):
# (1) the real-text accuracy suite (suites/accuracy-text.toml, or ACC_SUITE: small-llama pretrained on part of the
#     stdlib's sources, an lr grid per method, FALQON reference and the recommended variant
#     {a_scale = "kaiming", rounding = "stochastic", flush_every = 1});
# (2) the layer step time of default falqon vs that variant (llama-7b attn/up/down, r 16 and 64, 4096 tokens)
#     through the same runner, side by side in each of LAYER_ROUNDS back-to-back runs (default 3: on a
#     power-capped H200 two runs' ratios differ by up to ~3%), each round's ratios and their median
#     (flush_every = 1 does the same work every step, so a captured step times it exactly);
# (3) the proxy update alone, default vs the variant, back to back (the only work the variant changes), so its
#     cost is not lost in the drift between two step timings.
# Run from the repo root:  OUT=/some/dir bash scripts/gpu/accuracy.sh
# CPU dry run (tiny sizes, checks the script end to end):  OUT=/tmp/x bash scripts/gpu/accuracy.sh --cpu-smoke
# (ACC_SUITE=a CPU suite of yours; T_ACC / T_LAYER (per round) / T_UPDATE / T_REPORT: seconds per phase, 0 skips it;
#  LAYER_ROUNDS: runs of phase (2), default 3)
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output directory}"
SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
WORK="$(mktemp -d)"  # run directories live here; only the tarball and the summary go to $OUT (<= 8 files)
RUNS="$WORK/runs"
mkdir -p "$RUNS" "$WORK/suites" "$OUT"
VARIANT_TOML='{a_scale = "kaiming", rounding = "stochastic", flush_every = 1}'  # the recommended variant
VARIANT_JSON='{"a_scale": "kaiming", "rounding": "stochastic", "flush_every": 1}'

if [[ $SMOKE == 1 ]]; then
  # ACC_SUITE and T_ACC / T_LAYER / T_UPDATE as below (a CPU suite of your own, 0 skips a phase); by default a
  # shrunk accuracy-text suite
  if [[ -z "${ACC_SUITE:-}" ]]; then
    ACC_SUITE="$WORK/suites/accuracy-text-smoke.toml"
    sed -e 's/^device = "cuda"/device = "cpu"/' -e 's/^model = "small-llama"/model = "tiny-llama"/' \
        -e 's/^seq_len = 256/seq_len = 32/' -e 's/^batch = 32/batch = 2/' -e 's/^pretrain_steps = 400/pretrain_steps = 2/' \
        -e 's/^steps = 200/steps = 3/' -e 's/^eval_every = 50/eval_every = 2/' -e 's/^eval_batches = 8/eval_batches = 1/' \
        -e 's/^name = "accuracy-text"/name = "accuracy-text-smoke"/' \
        suites/accuracy-text.toml > "$ACC_SUITE"
  fi
  LAYERS='{name = "smoke.attn", K = 64, N = 64}'; RANKS='[16]'; TOKENS='[64]'; DEVICE=cpu; BUDGET=20
  UPDATE_ARGS=(--layers 64x64 --ranks 16 --device cpu --budget-ms 20)
  T_ACC=${T_ACC:-600}; T_LAYER=${T_LAYER:-300}; T_UPDATE=${T_UPDATE:-120}
else
  ACC_SUITE=${ACC_SUITE:-suites/accuracy-text.toml}
  LAYERS='"llama-7b.attn", "llama-7b.up", "llama-7b.down"'; RANKS='[16, 64]'; TOKENS='[4096]'; DEVICE=cuda; BUDGET=300
  UPDATE_ARGS=(--layers llama-7b.attn,llama-7b.up,llama-7b.down --ranks 16,64 --device cuda --budget-ms 200)
  T_ACC=${T_ACC:-330}; T_LAYER=${T_LAYER:-60}; T_UPDATE=${T_UPDATE:-50}  # seconds per phase (env overrides)
fi

cat > "$WORK/suites/falqon-variant-overhead.toml" <<TOML
# default falqon vs the recommended variant, one run
name = "falqon-variant-overhead"
device = "$DEVICE"
[timing]
budget_ms = $BUDGET
warmup_ms = 100
profile = false
[[grid]]
layers = [$LAYERS]
ranks = $RANKS
tokens = $TOKENS
methods = ["falqon"]
options = [{}, {falqon = $VARIANT_TOML}]
TOML

# a phase that runs out of time keeps what it finished (points.jsonl is appended point by point); a limit of 0
# skips the phase (timeout(1) would read 0 as "no limit")
echo "== (1) accuracy suite: $ACC_SUITE (limit ${T_ACC}s)"
if [[ $T_ACC -gt 0 ]]; then
  timeout -s INT -k 15 "$T_ACC" python -m falqon_bench.cli run "$ACC_SUITE" --out "$RUNS/accuracy-text" \
    --point-timeout-s 120 || echo "accuracy run exited $?"
else echo "skipped (T_ACC=0)"; fi
LAYER_ROUNDS=${LAYER_ROUNDS:-3}
echo "== (2) layer step time: default falqon vs the variant, $LAYER_ROUNDS round(s) (limit ${T_LAYER}s each)"
if [[ $T_LAYER -gt 0 ]]; then
  for ((round = 1; round <= LAYER_ROUNDS; round++)); do
    timeout -s INT -k 15 "$T_LAYER" python -m falqon_bench.cli run "$WORK/suites/falqon-variant-overhead.toml" \
      --out "$RUNS/falqon-variant-overhead-round$(printf %02d "$round")" || echo "overhead run $round exited $?"
  done
else echo "skipped (T_LAYER=0)"; fi
echo "== (3) proxy update alone (limit ${T_UPDATE}s)"
if [[ $T_UPDATE -gt 0 ]]; then
  echo "variant $VARIANT_JSON" >> "$RUNS/proxy-update-alone.txt"
  timeout "$T_UPDATE" python -m falqon_bench.measure.accuracy_update_cost "${UPDATE_ARGS[@]}" --variant "$VARIANT_JSON" \
    >> "$RUNS/proxy-update-alone.txt" 2>&1 || echo "update timing exited $?"
else echo "skipped (T_UPDATE=0)"; fi
if [[ ${T_REPORT:-30} -gt 0 && -s "$RUNS/accuracy-text/points.jsonl" ]]; then
  timeout "${T_REPORT:-30}" python -m falqon_bench.cli report "$RUNS/accuracy-text" --out "$RUNS/report-accuracy-text" || echo "report exited $?"
fi

# the pretrained base's state dict (base/) is a cache, not a result: left out
tar -czf "$OUT/accuracy-runs.tar.gz" --exclude=base -C "$WORK" runs suites
{
echo
echo "================ summary ================"
if [[ -s "$RUNS/accuracy-text/points.jsonl" ]]; then python -m falqon_bench.readers.accuracy_summary "$RUNS/accuracy-text" || true
else echo "accuracy suite: no points (phase (1) skipped or nothing finished)"; fi
# no round directory (phase (2) skipped): the unmatched glob is read as an empty round, "layer step: no points"
python -m falqon_bench.readers.step_ratio_summary "$RUNS"/falqon-variant-overhead-round*/ || true
cat "$RUNS/proxy-update-alone.txt" 2>/dev/null | grep -v '^W[0-9]' || true
} 2>&1 | tee "$OUT/summary.txt"
rm -rf "$WORK"
