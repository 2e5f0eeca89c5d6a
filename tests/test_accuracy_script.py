"""scripts/gpu/accuracy.sh --cpu-smoke: the CPU dry run of the GPU script honours ACC_SUITE and the phase limits
(T_ACC, T_LAYER, T_UPDATE = 0 skips a phase) and ends rc 0 with its summary, no traceback. It ignored both: the
smoke run always ran its own shrunk accuracy-text suite, with fixed limits."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY_SUITE = """kind = "accuracy"
name = "acc-script-tiny"
device = "cpu"
model = "tiny-llama"
corpus = "synthetic"
rank = 4
seq_len = 16
batch = 2
pretrain_steps = 2
steps = 2
eval_every = 1
eval_batches = 1
seeds = [0]
methods = [{label = "falqon+kA+sr+f1 [mine]", method = "falqon", options = {a_scale = "kaiming", rounding = "stochastic", flush_every = 1}}]
[lrs]
"falqon+kA+sr+f1 [mine]" = [1e-2]
"""


def run_script(tmp_path: Path, **limits: str) -> subprocess.CompletedProcess:
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY_SUITE)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "ACC_SUITE": str(suite), "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **limits}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(["bash", "scripts/gpu/accuracy.sh", "--cpu-smoke"], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300)


def test_cpu_smoke_with_every_phase_skipped_still_summarises(tmp_path):
    done = run_script(tmp_path, T_ACC="0", T_LAYER="0", T_UPDATE="0", T_REPORT="0")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert f"accuracy suite: {tmp_path / 'tiny.toml'}" in out, out
    assert "== summary" in out.replace("=" * 16 + " summary", "== summary") and "Traceback" not in out, out
    assert "skipped" in out, out
    assert (tmp_path / "out" / "summary.txt").exists() and (tmp_path / "out" / "accuracy-runs.tar.gz").exists()


def test_cpu_smoke_runs_the_given_accuracy_suite(tmp_path):
    done = run_script(tmp_path, T_LAYER="0", T_UPDATE="0", T_REPORT="0")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "falqon+kA+sr+f1 [mine]" in summary and "bf16_lora" not in summary, summary
    assert "Traceback" not in out, out


def test_cpu_smoke_times_the_layer_step_in_rounds_and_gives_their_median(tmp_path):
    done = run_script(tmp_path, T_ACC="0", T_UPDATE="0", T_REPORT="0", LAYER_ROUNDS="2")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "round 1:" in summary and "round 2:" in summary and "round 3:" not in summary, summary
    assert "median (min-max) of the ratio to default over 2 round(s)" in summary, summary
    assert "a_scale=kaiming,flush_every=1,rounding=stochastic" in summary and "Traceback" not in out, out
