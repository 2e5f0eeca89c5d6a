#!/usr/bin/env bash
# Does it still learn, and at what cost? On one H200 (about 7 min, each phase under its own time limit):
# (1) the real-text accuracy suite (suites/accuracy-text.toml: small-llama pretrained on part of the stdlib's
#     sources, an lr grid per method, FALQON reference and the recommended variant
#     {a_scale = "kaiming", rounding = "stochastic", keep_unmerged = true, flush_every = 4});
# (2) the layer step time of default falqon vs that variant (llama-7b attn/up/down, r 16 and 64, 4096 tokens)
#     through the same runner, side by side in one run. A captured step replays whatever its capture did, so a
#     step of flush_every = 4 would time either no flush or one on every step: the variant is timed without the
#     flush and with flush_every = 1, and the summary prints the amortized step, no-flush + (flush - no-flush) / 4;
# (3) the proxy update alone, default vs the variant without and with a flush on every update, back to back
#     (the only work the variant changes), so its cost is not lost in the drift between two step timings.
# Run from the repo root:  OUT=/some/dir bash scripts/gpu/accuracy.sh
# CPU dry run (tiny sizes, checks the script end to end):  OUT=/tmp/x bash scripts/gpu/accuracy.sh --cpu-smoke
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output directory}"
SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
WORK="$(mktemp -d)"  # run directories live here; only the tarball and the summary go to $OUT (<= 8 files)
RUNS="$WORK/runs"
mkdir -p "$RUNS" "$WORK/suites" "$OUT"
NOFLUSH_TOML='{a_scale = "kaiming", rounding = "stochastic", keep_unmerged = true}'
FLUSH1_TOML='{a_scale = "kaiming", rounding = "stochastic", keep_unmerged = true, flush_every = 1}'
NOFLUSH_JSON='{"a_scale": "kaiming", "rounding": "stochastic", "keep_unmerged": true}'
FLUSH1_JSON='{"a_scale": "kaiming", "rounding": "stochastic", "keep_unmerged": true, "flush_every": 1}'
FLUSH_EVERY=4  # the recommended variant's flush_every (suites/accuracy-text.toml)

if [[ $SMOKE == 1 ]]; then
  ACC_SUITE="$WORK/suites/accuracy-text-smoke.toml"
  sed -e 's/^device = "cuda"/device = "cpu"/' -e 's/^model = "small-llama"/model = "tiny-llama"/' \
      -e 's/^seq_len = 256/seq_len = 32/' -e 's/^batch = 32/batch = 2/' -e 's/^pretrain_steps = 400/pretrain_steps = 2/' \
      -e 's/^steps = 200/steps = 3/' -e 's/^eval_every = 50/eval_every = 2/' -e 's/^eval_batches = 8/eval_batches = 1/' \
      -e 's/^name = "accuracy-text"/name = "accuracy-text-smoke"/' \
      suites/accuracy-text.toml > "$ACC_SUITE"
  LAYERS='{name = "smoke.attn", K = 64, N = 64}'; RANKS='[16]'; TOKENS='[64]'; DEVICE=cpu; BUDGET=20
  UPDATE_ARGS=(--layers 64x64 --ranks 16 --device cpu --budget-ms 20)
  T_ACC=600; T_LAYER=300; T_UPDATE=120
else
  ACC_SUITE=${ACC_SUITE:-suites/accuracy-text.toml}
  LAYERS='"llama-7b.attn", "llama-7b.up", "llama-7b.down"'; RANKS='[16, 64]'; TOKENS='[4096]'; DEVICE=cuda; BUDGET=300
  UPDATE_ARGS=(--layers llama-7b.attn,llama-7b.up,llama-7b.down --ranks 16,64 --device cuda --budget-ms 200)
  T_ACC=${T_ACC:-330}; T_LAYER=${T_LAYER:-60}; T_UPDATE=${T_UPDATE:-50}  # seconds per phase (env overrides)
fi

cat > "$WORK/suites/falqon-variant-overhead.toml" <<TOML
# default falqon vs the recommended variant without its flush and with a flush every step, one run
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
options = [{}, {falqon = $NOFLUSH_TOML}, {falqon = $FLUSH1_TOML}]
TOML

# a phase that runs out of time keeps what it finished (points.jsonl is appended point by point)
echo "== (1) accuracy suite: $ACC_SUITE (limit ${T_ACC}s)"
timeout -s INT -k 15 "$T_ACC" python -m falqon_bench.cli run "$ACC_SUITE" --out "$RUNS/accuracy-text" --point-timeout-s 120 \
  || echo "accuracy run exited $?"
echo "== (2) layer step time: default falqon vs the variant (limit ${T_LAYER}s)"
timeout -s INT -k 15 "$T_LAYER" python -m falqon_bench.cli run "$WORK/suites/falqon-variant-overhead.toml" --out "$RUNS/falqon-variant-overhead" \
  || echo "overhead run exited $?"
echo "== (3) proxy update alone (limit ${T_UPDATE}s)"
for V in "$NOFLUSH_JSON" "$FLUSH1_JSON"; do
  [[ $T_UPDATE -gt 0 ]] || break
  echo "variant $V" >> "$RUNS/proxy-update-alone.txt"
  timeout "$((T_UPDATE / 2))" python -m falqon_bench.measure.accuracy_update_cost "${UPDATE_ARGS[@]}" --variant "$V" \
    >> "$RUNS/proxy-update-alone.txt" 2>&1 || echo "update timing exited $?"
done
[[ ${T_REPORT:-30} -gt 0 ]] && { timeout "${T_REPORT:-30}" python -m falqon_bench.cli report "$RUNS/accuracy-text" --out "$RUNS/report-accuracy-text" || echo "report exited $?"; }

# the pretrained base's state dict (base/) is a cache, not a result: left out
tar -czf "$OUT/accuracy-runs.tar.gz" --exclude=base -C "$WORK" runs suites
{
echo
echo "================ summary ================"
python -m falqon_bench.readers.accuracy_summary "$RUNS/accuracy-text" || true
python - "$RUNS/falqon-variant-overhead/points.jsonl" "$FLUSH_EVERY" <<'PY' || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
every = int(sys.argv[2])
by = {}
for r in rows:
    name = "flush1" if r["options"].get("flush_every") == 1 else "noflush" if r["options"] else "default"
    by.setdefault((r["layer"], r["rank"], r["tokens"]), {})[name] = r
print(f"layer step, gpu_ms (else wall_ms), median; variant = no-flush + (flush on every step - no-flush) / {every}")
print(f"{'layer':<16} {'rank':>4} {'default':>9} {'no-flush':>9} {'flush/step':>10} {'variant':>9} {'ratio':>7}")
for k, group in by.items():
    ms = {n: (r.get("gpu_ms") or r.get("wall_ms")) if r.get("status") == "ok" else None for n, r in group.items()}
    d, a, f = ms.get("default"), ms.get("noflush"), ms.get("flush1")
    v = a + (f - a) / every if a and f else None
    cell = lambda x: "-" if x is None else f"{x:.4f}"
    print(f"{k[0]:<16} {k[1]:>4} {cell(d):>9} {cell(a):>9} {cell(f):>10} {cell(v):>9} {(f'{v / d:.3f}' if d and v else '-'):>7}")
PY
cat "$RUNS/proxy-update-alone.txt" 2>/dev/null | grep -v '^W[0-9]' || true
} 2>&1 | tee "$OUT/summary.txt"
rm -rf "$WORK"
