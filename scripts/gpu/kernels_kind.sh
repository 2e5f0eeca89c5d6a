#!/usr/bin/env bash
# The kernel micro-benchmarks as a suite kind of the one runner (issue 14), on one H200 (about 5 minutes):
#   1. the GPU tests of kernel_bench and the kernels suite kind (a tiny cuda suite through runner.run_suite);
#   2. `falqon-bench run kernels` (suites/kernels.toml, 116 points, one worker per kernel) -> kernels-h200;
#   3. `--resume` of that run measures nothing more (every point is ok);
#   4. the alias `falqon-bench kernels --only transpose` -> kernels-alias;
#   5. `falqon-bench report` of the run renders;
#   6. a summary: status per kernel variant, and warm gpu_ms / GB/s / TFLOP/s at the largest shapes next to
#      results/kernels-h100 (the same point ids), printed at the end.
#
#   OUT=/tmp/out bash scripts/gpu/kernels_kind.sh               # on the GPU machine, from the repo root
#   OUT=/tmp/x bash scripts/gpu/kernels_kind.sh --cpu-smoke     # a tiny device = "cpu" copy of the suite: the plumbing only
#
# Output: $OUT/kernels_kind.tar.gz (the run directories, the report, log.txt) and the summary on stdout.
# A failing step is reported and the next one runs; the exit status is the first failing step's.
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output directory}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

work="$OUT/kernels_kind"
rm -rf "$work"
mkdir -p "$work"
log="$work/log.txt"
suite=kernels
smoke=0
if [[ "${1:-}" == "--cpu-smoke" || "${KERNELS_KIND_CPU_SMOKE:-0}" == "1" ]]; then
    smoke=1
    export TRITON_INTERPRET=1  # falqon's Triton kernels on CPU
    suite="$work/kernels-cpu-smoke.toml"
    cat > "$suite" <<'EOF'
kind = "kernels"
name = "kernels-cpu-smoke"
device = "cpu"
caches = ["warm"]
implementations = ["triton", "torch", "cublas"]
[timing]
budget_ms = 2
warmup_ms = 0
min_samples = 2
[shapes]
quantize = [[8, 64]]
proxy = [[16, 64, 4, 4]]
gemm = [[32, 64, 64, 8]]
transpose = [[8, 64]]
EOF
fi

status=0
step() {  # step NAME CMD...: run, log, and remember the first failure without stopping
    echo "=== $(date -u +%T) $1" | tee -a "$log"
    shift
    local rc=0 start
    start=$(($(wc -l <"$log") + 1))
    "$@" >>"$log" 2>&1 || rc=$?
    tail -n "+$start" "$log" | grep -v -E "_pytree|RuntimeWarning|np.log2|getattr\(ufunc" | tail -30 || true
    echo "--- rc=$rc" | tee -a "$log"
    if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
}

bench=(python -m falqon_bench.cli)  # an array, not a function: `timeout` runs it

step "GPU tests (kernel_bench, kernels suite kind)" \
    timeout 300 python -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_kernel_bench.py tests/test_kernels_suite.py
step "run $suite" timeout 480 "${bench[@]}" run "$suite" --out "$work/kernels-h200" --point-timeout-s 240
step "resume: nothing left to measure" timeout 300 "${bench[@]}" run "$suite" --out "$work/kernels-h200" --resume
if [[ $smoke -eq 1 ]]; then
    # on a CPU the packaged suite (device = "cuda") must exit 2 before writing anything
    echo "=== $(date -u +%T) alias on CPU: expect exit 2" | tee -a "$log"
    rc=0; "${bench[@]}" kernels --only transpose --out "$work/kernels-alias" >>"$log" 2>&1 || rc=$?
    echo "--- rc=$rc (want 2)" | tee -a "$log"
    if [[ $rc -ne 2 && $status -eq 0 ]]; then status=1; fi
else
    step "alias: kernels --only transpose" timeout 300 "${bench[@]}" kernels --only transpose --out "$work/kernels-alias"
fi
step "report" timeout 300 "${bench[@]}" report "$work/kernels-h200" --out "$work/report"

python - "$work" <<'EOF' 2>&1 | tee -a "$log" || true
"""Summary: rows per status and kernel; warm median at the largest shape per variant, next to kernels-h100."""
import collections, gzip, json, sys
from pathlib import Path

work = Path(sys.argv[1])

def rows(run):
    path = run / "points.jsonl"
    if not path.exists():
        path = run / "points.jsonl.gz"
    if not path.exists():
        return []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]

new = rows(work / "kernels-h200")
manifest = json.loads((work / "kernels-h200" / "manifest.json").read_text()) if (work / "kernels-h200" / "manifest.json").exists() else {}
old = {r["point_id"]: r for r in rows(Path("results/kernels-h100"))}
print(f"\nrun: {len(new)} rows, manifest status {manifest.get('status')}, resumed {manifest.get('resumed', 0)}, "
      f"device {manifest.get('device')}, peaks {json.dumps(manifest.get('peaks'))}")
alias = rows(work / "kernels-alias")
print(f"alias run (--only transpose): {len(alias)} rows, statuses {dict(collections.Counter(r['status'] for r in alias))}")
by = collections.Counter((r["method"].split(".")[1], r["status"], r.get("gpu_timing")) for r in new)
print("\nrows by kernel, status, timing:")
for (kernel, status, timing), n in sorted(by.items()):
    print(f"  {kernel:<28} {status:<6} {timing:<10} {n}")
errors = [r for r in new if r["status"] != "ok"]
for r in errors[:10]:
    print(f"  ERROR {r['method']} {r['layer']} {r['cache']}: {r['error']}")
def ms(r):
    return r.get("gpu_ms") if r.get("gpu_ms") is not None else r.get("wall_ms")
def f(v, spec):
    return "-" if v is None else format(v, spec)
largest = {}
for r in new:
    if r["cache"] == "warm" and r["status"] == "ok":
        key = r["method"]
        if key not in largest or r["K"] * r["N"] * max(r["tokens"], 1) > largest[key]["K"] * largest[key]["N"] * max(largest[key]["tokens"], 1):
            largest[key] = r
print(f"\nwarm, largest shape per variant: ms (this run) | ms (kernels-h100, same point id) | GB/s | % copy BW | TFLOP/s")
print(f"{'method':<42} {'layer':<16} {'ms':>9} {'h100 ms':>9} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8}")
for method, r in largest.items():
    o = old.get(r["point_id"])
    print(f"{method:<42} {r['layer']:<16} {f(ms(r), '.4f'):>9} {f(o and o.get('gpu_ms'), '.4f'):>9} "
          f"{f(r.get('gbps'), '.0f'):>7} {f(r.get('pct_of_copy_bw'), '.1f'):>6} {f(r.get('tflops'), '.1f'):>8}")
EOF

tar -czf "$OUT/kernels_kind.tar.gz" -C "$OUT" kernels_kind
echo "wrote $OUT/kernels_kind.tar.gz (exit status: $status)"
exit "$status"
