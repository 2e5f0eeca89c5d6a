#!/usr/bin/env bash
# Runs falqon-bench on the lent GPU machine (device tool): installs the carried wheels and the project,
# then runs the stages named on the command line, writing everything under $OUT.
#   bash scripts/gpu_session.sh tests kernels "run suites/overhead.toml --out $OUT/results/overhead"
#   bash scripts/gpu_session.sh tests=tests/test_timing.py,tests/test_e2e.py "kernels --only quantize"
# The copy of the tree on the GPU machine may carry a stale .git: put the commit you send in front,
#   FALQON_GIT_SHA=<output of `git rev-parse HEAD` here> bash scripts/gpu_session.sh ...
# and commit first, so that the sha names exactly the code that ran.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "project install failed"; exit 3; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
mkdir -p "$OUT/results"
for stage in "$@"; do
  echo "=== $stage ($(date +%T))"
  case "$stage" in
    tests|tests=*)
      # every file with gpu tests, or `tests=tests/test_a.py,tests/test_b.py`;
      # one pytest process per file: a failed CUDA-graph capture can poison the process's CUDA RNG
      files=$(grep -l -E "mark\.gpu|pytestmark" tests/test_*.py)
      [ "$stage" != tests ] && files=${stage#tests=} && files=${files//,/ }
      for f in $files; do
        python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 240 --tb=short "$f" >> "$OUT/gpu_tests.txt" 2>&1
        echo "$f: $(tail -1 "$OUT/gpu_tests.txt")"
      done ;;
    kernels|"kernels "*) falqon-bench $stage --out "$OUT/results/kernels" 2>&1 | grep -v "W1127" | tail -60 ;;  # --out: the run dir
    *) falqon-bench $stage 2>&1 | grep -v "W1127" | tail -40 ;;
  esac
done
echo "=== end ($(date +%T))"
ls -R "$OUT/results" | head -30
