#!/usr/bin/env bash
# Runs falqon-bench on the lent GPU machine (device tool): installs the carried wheels and the project,
# then runs the stages named on the command line, writing everything under $OUT.
#   bash scripts/gpu_session.sh tests smoke kernels "run suites/overhead.toml" ...
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
    tests) python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 240 -x -rf 2>&1 | grep -v "^W1127\|Warning" | tail -40 ;;
    tests-all) python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 240 -rf 2>&1 | grep -v "^W1127\|Warning" | tail -60 ;;
    kernels) falqon-bench kernels --out "$OUT/results" 2>&1 | grep -v "W1127" | tail -60 ;;
    *) falqon-bench $stage 2>&1 | grep -v "W1127" | tail -40 ;;
  esac
done
echo "=== end ($(date +%T))"
ls -R "$OUT/results" | head -30
