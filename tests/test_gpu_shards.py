"""`falqon-bench run SUITE --gpus all|N`: one shard process per device, merged into one run directory.

The CPU test uses a fake device list (two CPU "GPUs", CUDA_VISIBLE_DEVICES empty) so the real path runs: two
`falqon-bench run --shard i/2` processes at once, then `merge`; the merged run must hold exactly the points a
single run of the whole suite would, each once.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from falqon_bench.cli import app
from falqon_bench.data.errors import BenchInputError
from falqon_bench.measure.gpu_shards import ShardDevice, passthrough_args, parse_gpus, run_on_devices, shard_dir
from falqon_bench.measure.runner import RunOptions, plan_points
from falqon_bench.data.store import load_run
from falqon_bench.suites.suite import load_suite

TINY_SUITE = """name = "tiny-shards"
device = "cpu"

[timing]
budget_ms = 5
warmup_ms = 0
min_samples = 2
profile = false

[defaults]
tokens = [16]
compile = [false]
dtype = ["bfloat16"]

[[grid]]
layers = [{ name = "tiny.32x32", K = 32, N = 32 }, { name = "tiny.32x48", K = 32, N = 48 }]
ranks = [16]
methods = ["bf16_linear", "bf16_lora"]  # 4 points: each shard gets two
"""


def test_gpus_all_and_a_count_pick_that_many_visible_gpus():
    assert parse_gpus("all", ["0", "1", "5"]) == [ShardDevice("cuda:0", "0"), ShardDevice("cuda:1", "1"), ShardDevice("cuda:5", "5")]
    assert [d.visible for d in parse_gpus("2", ["4", "5", "6"])] == ["4", "5"]


@pytest.mark.parametrize("text, available, says", [
    ("3", ["0", "1"], "only 2 GPU(s)"), ("zero", ["0"], "`all` or a number"), ("0", ["0"], "`all` or a number"),
    ("all", [], "no CUDA GPU"),
])
def test_gpus_that_are_not_there_are_refused_with_what_is_allowed(text, available, says):
    with pytest.raises(BenchInputError, match="--gpus") as e:
        parse_gpus(text, available)
    assert says in str(e.value)


def test_run_with_gpus_on_a_machine_without_gpus_exits_2(tmp_path):
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY_SUITE)
    result = CliRunner().invoke(app, ["run", str(suite), "--gpus", "all", "--out", str(tmp_path / "run")],
                                env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.exit_code == 2 and "no CUDA GPU" in result.output
    result = CliRunner().invoke(app, ["run", str(suite), "--gpus", "2", "--shard", "1/2"])
    assert result.exit_code == 2 and "--gpus and --shard" in result.output
    assert not (tmp_path / "run").exists()


def test_passthrough_keeps_the_run_options_each_shard_needs():
    options = RunOptions(methods=["falqon"], ranks=[16, 64], isolate=False, budget_ms=50.0, min_samples=3)
    args = passthrough_args(options)
    assert args[args.index("--methods") + 1] == "falqon" and args[args.index("--ranks") + 1] == "16,64"
    assert "--no-isolate" in args and args[args.index("--budget-ms") + 1] == "50.0" and "--warmup-ms" not in args
    assert "--shard" not in args and "--out" not in args


def test_two_device_shards_merge_into_one_run_equal_to_the_whole_suite(tmp_path):
    suite_path = tmp_path / "tiny.toml"
    suite_path.write_text(TINY_SUITE)
    suite = load_suite(str(suite_path))
    cpu = [ShardDevice("cpu", ""), ShardDevice("cpu", "")]
    options = RunOptions(isolate=False)
    out, codes = run_on_devices(str(suite_path), cpu, tmp_path / "run", passthrough_args(options), echo=lambda *a: None)
    assert codes == {1: 0, 2: 0}, [p.read_text()[-2000:] for p in (out / "shards").glob("*.log")]
    merged = load_run(out)
    whole = [p["point_id"] for p in plan_points(suite, options)]
    assert sorted(p["point_id"] for p in merged.points) == sorted(whole)  # every point once, none twice
    assert all(p["status"] == "ok" for p in merged.points), [p["error"] for p in merged.points]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["gpus"] == ["cpu", "cpu"] and manifest["shards"] == 2 and manifest["shards_merged"] == [1, 2]
    assert manifest["status"] == "merged" and manifest["shards_failed"] == []
    for i in (1, 2):
        shard = load_run(shard_dir(out, i, 2))
        assert shard.manifest["shard"] == f"{i}/2" and 0 < len(shard.points) < len(whole)
    with pytest.raises(BenchInputError, match="--resume"):
        run_on_devices(str(suite_path), cpu, out, [], echo=lambda *a: None)
