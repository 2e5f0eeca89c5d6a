# old (default tiles for O_A) and new (le1M/thin) tables, alternating, then a per-cell table
set -u
for i in ${PAIRS:-1 2}; do
  FALQON_KERNEL_TABLE=results/probes-step-h200/oa-cells/old-thin.json timeout 40 python -m falqon_bench.cli run results/probes-step-h200/oa-cells/suite.toml --out $OUT/old$i > /dev/null 2>&1 || echo "old$i exit $?"
  timeout 40 python -m falqon_bench.cli run results/probes-step-h200/oa-cells/suite.toml --out $OUT/new$i > /dev/null 2>&1 || echo "new$i exit $?"
done
python - <<'PY'
import json, os
O = os.environ["OUT"]
def load(d):
    return {(r["layer"], r["rank"], r["tokens"]): r for r in map(json.loads, open(f"{O}/{d}/points.jsonl"))}
runs = {d: load(d) for d in ("old1", "new1", "old2", "new2") if os.path.exists(f"{O}/{d}/points.jsonl")}
print(f"{'layer':<16}{'r':>4}{'M':>6}  old1/old2 ms    new1/new2 ms   new/old   % floor old -> new")
for key in runs["old1"]:
    g = [runs.get(d, {}).get(key, {}).get("gpu_ms") or float("nan") for d in ("old1", "old2", "new1", "new2")]
    f = runs["old1"][key]["floor_ms"]
    o, n = min(g[0], g[1]) if g[1] == g[1] else g[0], min(g[2], g[3]) if g[3] == g[3] else g[2]
    print(f"{key[0]:<16}{key[1]:>4}{key[2]:>6}  {g[0]:.4f}/{g[1]:.4f}  {g[2]:.4f}/{g[3]:.4f}  {n/o:.3f}   {100*f/o:.1f} -> {100*f/n:.1f}")
PY
