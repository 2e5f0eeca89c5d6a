#!/usr/bin/env bash
# default falqon, default + cache_weight_t, the recommended variant, variant + cache_weight_t: ROUNDS runs of
# variant-cost.toml (beside this script) back to back (each run times the four option sets side by side), then per-round and
# median ratios. Writes $OUT/variant-rounds.tar.gz and $OUT/variant-rounds.txt.
set -uo pipefail
W=$(mktemp -d)
for i in $(seq 1 "${ROUNDS:-3}"); do
  timeout 150 python -m falqon_bench.cli run "$(dirname "$0")/variant-cost.toml" --variant eager --out "$W/round$i" >/dev/null 2>&1 || echo "round $i exited $?"
done
python "$(dirname "$0")/ratio.py" "$W"/round*/points.jsonl > "$OUT/variant-rounds.txt" 2>&1  # = python -m falqon_bench.readers.step_ratio_summary "$W"/round*
tar -czf "$OUT/variant-rounds.tar.gz" -C "$W" .
cat "$OUT/variant-rounds.txt"
