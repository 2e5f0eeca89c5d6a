"""Step ratios of falqon option sets per (layer, rank), per round and median over rounds: ratio.py points.jsonl..."""
import json, statistics, sys
names = ["default", "default+cache", "variant", "variant+cache"]
rounds = []
for path in sys.argv[1:]:
    by = {}
    for r in (json.loads(l) for l in open(path) if l.strip()):
        o = r["options"] or {}
        name = ("variant" if o.get("flush_every") else "default") + ("+cache" if o.get("cache_weight_t") else "")
        by.setdefault((r["layer"], r["rank"]), {})[name] = r.get("gpu_ms") if r.get("status") == "ok" else None
    rounds.append(by)
f = lambda x: "-" if x is None else f"{x:.4f}"
q = lambda a, b: None if not (a and b) else a / b
g3 = lambda x: "-" if x is None else f"{x:.3f}"
for i, by in enumerate(rounds):
    print(f"round {i + 1}: gpu_ms (CUDA-graph replay, median of the point's samples) and ratios to default")
    print(f"{'layer':<16}{'r':>4} " + " ".join(f"{n:>14}" for n in names) + "    v/d   vc/d   dc/d")
    for (l, rk), g in by.items():
        d, dc, v, vc = (g.get(n) for n in names)
        print(f"{l:<16}{rk:>4} " + " ".join(f"{f(x):>14}" for x in (d, dc, v, vc))
              + f"  {g3(q(v, d)):>5}  {g3(q(vc, d)):>5}  {g3(q(dc, d)):>5}")
if len(rounds) > 1:
    print(f"median over {len(rounds)} rounds of the per-round ratio to default (min-max)")
    for key in rounds[0]:
        cells = []
        for n in names[1:]:
            xs = [q(by[key].get(n), by[key].get("default")) for by in rounds if key in by]
            xs = [x for x in xs if x]
            cells.append(f"{n}: {statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})" if xs else f"{n}: -")
        print(f"{key[0]:<16}{key[1]:>4}  " + "   ".join(cells))
