"""FALQON's options are refused at suite load (parse_options), not one error row per point at run time.

parse_options is what a suite's validation calls (check_method_options): a value the layer would refuse for
every shape must fail there, so `falqon-bench run` exits 2 naming the key instead of finishing rc 0 with error
rows; and a flag must be a boolean (bool("false") is True: keep_unmerged = "false" silently kept B).
"""

import pytest

from falqon_core.methods.falqon import parse_options


@pytest.mark.parametrize(
    "options, message",
    [
        ({"flush_every": -1}, "flush_every must be an integer >= 0"),
        ({"warmup_steps": -2}, "warmup_steps must be an integer >= 0"),
        ({"a_redraw": -1}, "a_redraw must be an integer >= 0"),
        ({"topk": 0}, "topk must be an integer >= 1"),
        ({"topk_after": 0}, "topk_after must be an integer >= 1"),
        ({"a_redraw": 2}, "a_redraw = 2 needs flush_every > 0"),
        ({"a_redraw": 2, "flush_every": 0}, "a_redraw = 2 needs flush_every > 0"),
        ({"keep_unmerged": "false"}, "keep_unmerged must be true or false"),
        ({"cache_weight_t": 1}, "cache_weight_t must be true or false"),
    ],
)
def test_values_no_layer_accepts_are_refused_by_parse_options(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options(options)


def test_the_recommended_variant_and_its_combinations_parse():
    variant = {"a_scale": "kaiming", "rounding": "stochastic", "flush_every": 1}
    assert parse_options(variant) == variant
    combined = {**variant, "keep_unmerged": True, "a_redraw": 2, "cache_weight_t": False, "topk": 3, "warmup_steps": 0}
    assert parse_options(combined) == combined


def test_a_suite_with_a_negative_flush_every_exits_2_at_load(tmp_path):
    from falqon_bench.data.errors import BenchInputError
    from falqon_bench.suites.suite import load_suite

    path = tmp_path / "bad.toml"
    path.write_text(
        'name = "bad"\ndevice = "cpu"\n[[grid]]\nlayers = [{ name = "t", K = 64, N = 48 }]\nranks = [5]\ntokens = [32]\n'
        'methods = ["falqon"]\noptions = [{}, { falqon = { flush_every = -1 } }]\n'
    )
    with pytest.raises(BenchInputError, match="flush_every must be an integer >= 0"):
        load_suite(str(path))
