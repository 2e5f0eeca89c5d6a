"""Option-set labels (falqon[key=value,...]) name one option set each: figures, the report's tables, compare's
point keys and pytest-benchmark ids all use them, so two option sets must never print alike. Values printed bare
once read 'a="1,b=2"' and 'a=1, b=2' alike (and "1" / 1, "true" / true); such strings are now quoted."""

import math

import pytest

from falqon_bench.data.pytest_benchmark_format import benchmark_id
from falqon_bench.data.schema import option_set_label
from falqon_bench.readers.gate import point_key

LOOKALIKES = [
    ({"a": "1,b=2"}, {"a": 1, "b": 2}),
    ({"rounding": "1"}, {"rounding": 1}),
    ({"keep_unmerged": "true"}, {"keep_unmerged": True}),
    ({"x": "inf"}, {"x": math.inf}),
    ({"x": "null"}, {"x": None}),
    ({"x": "[1,2]"}, {"x": [1, 2]}),
    ({"x": "a,y=b"}, {"x": "a", "y": "b"}),
    ({"a=1,b": 2}, {"a": 1, "b": 2}),  # a key, too (a hand-written results file)
]


@pytest.mark.parametrize("one, other", LOOKALIKES)
def test_lookalike_option_sets_get_distinct_labels_keys_and_ids(one, other):
    assert option_set_label("falqon", one) != option_set_label("falqon", other)
    point = {"method": "falqon", "layer": "t1", "rank": 5, "tokens": 20, "compile": False, "cache": "warm"}
    assert point_key({**point, "options": one}) != point_key({**point, "options": other})
    assert benchmark_id({**point, "options": one}) != benchmark_id({**point, "options": other})


def test_plain_option_values_print_as_before_and_odd_ones_stay_legible():
    variant = {"a_scale": "kaiming", "rounding": "stochastic", "flush_every": 1}
    assert option_set_label("falqon", variant) == "falqon[a_scale=kaiming,flush_every=1,rounding=stochastic]"
    assert option_set_label("fp6_lora", {"fp6_format": "e3m2", "x": 0.5, "y": False}) == "fp6_lora[fp6_format=e3m2,x=0.5,y=false]"
    assert option_set_label("halo_lora", {"name": "llama-7b.attn"}) == "halo_lora[name=llama-7b.attn]"
    assert option_set_label("falqon", {}) == "falqon"
    assert option_set_label("falqon", {"tag": "a b, [c] é"}) == 'falqon[tag="a b, [c] é"]'  # unicode as is


def test_exported_option_columns_keep_unicode_readable(tmp_path):
    """export's list/dict columns are JSON text: an option value 'é' was written as the escape '\\u00e9'."""
    from fixtures.results import H100, make_point, write_run

    from falqon_bench.data.store import export_points

    point = make_point("falqon", "t1", 5, gpu_samples=[0.5] * 5, options={"tag": "a b, [c] é"})
    out = export_points([write_run(tmp_path, "run", H100, [point])], tmp_path / "points.csv")
    text = out.read_text(encoding="utf-8")
    assert "é" in text and "\\u00e9" not in text
