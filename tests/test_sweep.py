"""Sweep expansion: counts, several grids, defaults, grouping by method, shards, stable point ids."""

import pytest

from falqon_bench.data.errors import BenchInputError
from falqon_bench.data.schema import point_id
from falqon_bench.suites.suite import load_suite, validate_suite
from falqon_bench.suites.sweep import expand_suite, filter_methods, parse_shard, shard_points

TINY = [{"name": "a", "K": 32, "N": 48}, {"name": "b", "K": 64, "N": 32}]


def suite(*grids, defaults=None, name="t"):
    return validate_suite({"name": name, "device": "cpu", "defaults": defaults or {}, "grid": list(grids)})


def test_one_grid_is_the_cartesian_product_of_its_axes():
    s = suite({"layers": TINY, "ranks": [4, 8, 16], "tokens": [16, 32], "methods": ["bf16_linear", "bf16_lora"], "compile": [False, True]})
    points = expand_suite(s)
    assert len(points) == 2 * 3 * 2 * 2 * 2
    assert {(p["layer"], p["K"], p["N"]) for p in points} == {("a", 32, 48), ("b", 64, 32)}
    assert all(p["cache"] == "warm" and p["dtype"] == "bfloat16" and p["options"] == {} for p in points)


def test_several_grids_add_up_and_overlapping_points_appear_once():
    eager = {"layers": TINY, "ranks": [4, 8, 16], "methods": ["bf16_lora", "falqon"], "compile": [False]}
    compiled = {"ranks": [8], "methods": ["falqon"], "compile": [True]}
    overlap = {"ranks": [8], "methods": ["falqon"]}  # eager rank 8 falqon again: already in the first grid
    points = expand_suite(suite(eager, compiled, overlap, defaults={"layers": TINY, "tokens": [16]}))
    assert len(points) == 2 * 3 * 2 + 2 * 1
    assert len({p["point_id"] for p in points}) == len(points)
    assert sum(p["compile"] for p in points) == 2


def test_defaults_fill_only_what_a_grid_leaves_out():
    s = suite({"layers": TINY, "ranks": [4], "methods": ["bf16_lora"], "tokens": [99]}, defaults={"tokens": [16], "cache": ["cold"]})
    (p, q) = expand_suite(s)
    assert p["tokens"] == q["tokens"] == 99 and p["cache"] == "cold"


def test_options_go_to_their_method_only_and_a_list_of_tables_is_an_axis():
    s = suite(
        {"layers": TINY[:1], "ranks": [16], "tokens": [16], "methods": ["bf16_lora", "falqon"],
         "options": [{"falqon": {"topk": 4}}, {"falqon": {"topk": 16}}]}
    )  # fmt: skip
    points = expand_suite(s)
    assert sorted((p["method"], p["options"].get("topk")) for p in points) == [("bf16_lora", None), ("falqon", 4), ("falqon", 16)]


def test_points_are_grouped_by_method_in_the_order_the_suite_names_them():
    s = suite(
        {"layers": TINY, "ranks": [4, 8], "tokens": [16], "methods": ["falqon", "bf16_lora"]},
        {"layers": TINY, "ranks": [32], "tokens": [16], "methods": ["bf16_linear", "falqon"]},
    )
    methods = [p["method"] for p in expand_suite(s)]
    assert methods == ["falqon"] * 6 + ["bf16_lora"] * 4 + ["bf16_linear"] * 2
    assert expand_suite(s) == expand_suite(s), "deterministic"


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_shards_partition_the_points_exactly_once_and_stay_grouped(n):
    points = expand_suite(load_suite("overhead"))
    shards = [shard_points(points, i, n) for i in range(1, n + 1)]
    ids = [p["point_id"] for shard in shards for p in shard]
    assert sorted(ids) == sorted(p["point_id"] for p in points) and len(ids) == len(set(ids))
    order = {p["point_id"]: j for j, p in enumerate(points)}
    for shard in shards:
        assert [order[p["point_id"]] for p in shard] == sorted(order[p["point_id"]] for p in shard)
        methods = [p["method"] for p in shard]
        assert methods == sorted(methods, key=methods.index), "each method's points are contiguous"
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_shipped_suites_have_the_intended_sizes():
    assert len(expand_suite(load_suite("smoke"))) == 2 * 2 * 4
    assert len(expand_suite(load_suite("overhead"))) == 3 * 5 * 8 + 3 * 1 * 7
    assert len(expand_suite(load_suite("methods"))) == (3 + 4) * 8
    assert len(expand_suite(load_suite("ranks"))) == 5 * 5 * 5
    assert len(expand_suite(load_suite("e2e_layers"))) == 3 * 8


def test_point_ids_are_stable_and_change_with_any_identity_key():
    s = suite({"layers": TINY[:1], "ranks": [4], "tokens": [16], "methods": ["bf16_lora"]})
    (p,) = expand_suite(s)
    # the id of this exact point is fixed: --resume of a run written by an older version depends on it
    assert p["point_id"] == "c2ca67e3670271f3"
    assert p["point_id"] == point_id({k: v for k, v in p.items() if k not in ("point_id", "per_block")})
    for key, other in [("rank", 8), ("tokens", 32), ("compile", True), ("cache", "cold"), ("options", {"x": 1}), ("suite", "u")]:
        assert point_id({**p, key: other}) != p["point_id"], key
    assert point_id({**p, "per_block": 7}) == p["point_id"], "per_block describes the layer, not the point"


def test_method_filter_keeps_only_named_methods_and_rejects_names_not_in_the_suite():
    points = expand_suite(load_suite("smoke"))
    kept = filter_methods(points, ["falqon"])
    assert {p["method"] for p in kept} == {"falqon"} and len(kept) == 4
    with pytest.raises(BenchInputError, match="methods in this suite: bf16_linear, bf16_lora, falqon, fp8_lora"):
        filter_methods(points, ["qlora_nf4"])


@pytest.mark.parametrize("text", ["0/4", "5/4", "1-4", "a/b", "1/0"])
def test_bad_shard_specs_are_input_errors(text):
    with pytest.raises(BenchInputError, match="--shard"):
        parse_shard(text)


def test_shard_spec_is_one_based():
    assert parse_shard("1/4") == (1, 4) and parse_shard("4/4") == (4, 4)
