"""Suite files: the shipped suites load; every kind of mistake exits 2 with one paragraph naming file, key, line, allowed values."""

import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from falqon_bench.cli import app
from falqon_bench.data.errors import BenchInputError
from falqon_bench.suites.layers import resolve_layer
from falqon_bench.suites.suite import find_key_line, known_suites, load_suite, validate_suite

REPO = Path(__file__).resolve().parents[1]
GOOD = """\
name = "t"
device = "cpu"
[timing]
budget_ms = 5
[defaults]
tokens = [16]
[[grid]]
layers = [{name = "t.32x48", K = 32, N = 48}]
ranks = [4, 8]
methods = ["bf16_linear"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.toml"
    path.write_text(textwrap.dedent(text))
    return path


def run_cli_error(path: Path) -> str:
    """`falqon-bench run PATH --dry-run` must exit 2 with one red paragraph on stderr and no traceback."""
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert str(path) in message
    return message


@pytest.mark.parametrize("name", ["smoke", "overhead", "methods", "ranks", "e2e_layers"])
def test_every_shipped_suite_loads(name):
    suite = load_suite(name)
    assert suite.name == name and suite.description and suite.grids
    assert str(suite.path).startswith(str(REPO / "suites")) and "#" in suite.raw_text.splitlines()[0]


def test_overhead_suite_runs_all_ranks_eager_and_only_rank_64_compiled():
    suite = load_suite("overhead")
    eager, compiled = suite.grids
    assert eager.compile == [False] and eager.ranks == [16, 32, 64, 128, 256] and len(eager.methods) == 8
    assert compiled.compile == [True] and compiled.ranks == [64]
    assert [s.name for s in eager.layers] == ["llama-7b.attn", "llama-7b.up", "llama-7b.down"]
    from falqon_core.methods import get_method

    assert compiled.methods == [m for m in eager.methods if get_method(m).supports_compile], "every method that supports compile"


def test_named_shapes_come_from_the_published_configs():
    assert [(s.name, s.K, s.N, s.per_block) for s in resolve_layer("llama-7b")] == [
        ("llama-7b.attn", 4096, 4096, 4), ("llama-7b.up", 4096, 11008, 2), ("llama-7b.down", 11008, 4096, 1),
    ]  # fmt: skip
    assert [(s.name, s.K, s.N, s.per_block) for s in resolve_layer("llama-3-8b")] == [
        ("llama-3-8b.attn", 4096, 4096, 2), ("llama-3-8b.kv", 4096, 1024, 2),
        ("llama-3-8b.up", 4096, 14336, 2), ("llama-3-8b.down", 14336, 4096, 1),
    ]  # fmt: skip
    assert [(s.K, s.N) for s in resolve_layer("mistral-7b")] == [(s.K, s.N) for s in resolve_layer("llama-3-8b")]
    assert [(s.K, s.N) for s in resolve_layer("llama-13b")] == [(5120, 5120), (5120, 13824), (13824, 5120)]


@pytest.mark.parametrize("line, key", [("ranks = 4", "ranks"), ('methods = "bf16_linear"', "methods")])
def test_a_scalar_where_a_list_is_expected_is_an_error_showing_the_list(tmp_path, line, key):
    text = GOOD.replace("ranks = [4, 8]", line) if key == "ranks" else GOOD.replace('methods = ["bf16_linear"]', line)
    msg = run_cli_error(write(tmp_path, text))
    assert f"bad value for `{key}` in [[grid]] #1" in msg and "where a list is expected" in msg
    assert ("[4]" if key == "ranks" else '["bf16_linear"]') in msg


def test_tokens_scalar_in_defaults_is_an_error_not_a_silent_one_element_sweep(tmp_path):
    msg = run_cli_error(write(tmp_path, GOOD.replace("tokens = [16]", "tokens = 32")))
    assert "`tokens` in [defaults]" in msg and "line 6" in msg and "write a list: [32]" in msg


def test_misspelled_key_names_file_table_line_and_allowed_keys(tmp_path):
    path = write(tmp_path, GOOD.replace("ranks = [4, 8]", "rank = [4, 8]"))
    msg = run_cli_error(path)
    assert "unknown key `rank` in [[grid]] #1" in msg and "line 9" in msg
    assert "allowed keys: layers, ranks, tokens, methods, compile, cache, dtype, options" in msg


def test_misspelled_timing_key_lists_timing_keys(tmp_path):
    msg = run_cli_error(write(tmp_path, GOOD.replace("budget_ms = 5", "budget = 5")))
    assert "unknown key `budget` in [timing]" in msg and "line 4" in msg and "budget_ms, warmup_ms, min_samples, cache, profile" in msg


def test_wrong_type_names_the_key_item_and_expected_type(tmp_path):
    msg = run_cli_error(write(tmp_path, GOOD.replace("ranks = [4, 8]", 'ranks = [4, "8"]')))
    assert "`ranks` item 2 in [[grid]] #1" in msg and "line 9" in msg and "valid integer" in msg and "'8'" in msg


def test_bad_literal_lists_the_allowed_values(tmp_path):
    msg = run_cli_error(write(tmp_path, GOOD.replace("budget_ms = 5", 'budget_ms = 5\ncache = "hot"')))
    assert "`cache` in [timing]" in msg and "line 5" in msg and "'warm' or 'cold'" in msg


def test_unknown_method_lists_the_registered_methods(tmp_path):
    msg = run_cli_error(write(tmp_path, GOOD.replace('"bf16_linear"', '"bf16_lroa"')))
    assert "unknown method `bf16_lroa`" in msg and "line 10" in msg
    assert "registered methods: bf16_linear, bf16_lora" in msg


def test_unknown_layer_lists_the_named_shapes(tmp_path):
    msg = run_cli_error(write(tmp_path, GOOD.replace('{name = "t.32x48", K = 32, N = 48}', '"llama-7b.atn"')))
    assert "unknown layer `llama-7b.atn`" in msg and "line 8" in msg and "llama-7b.attn" in msg and "llama-3-8b.kv" in msg


def test_a_directory_with_a_models_config_is_all_its_layers_found_next_to_the_suite(tmp_path, monkeypatch):
    """`layers = ["models/q"]`: the config.json there gives '<dir>.attn', '.kv' (GQA), '.up', '.down' with their widths,
    from any working directory; a config without the widths exits 2 naming the file and what is missing."""
    (tmp_path / "models" / "q").mkdir(parents=True)
    (tmp_path / "models" / "q" / "config.json").write_text(
        '{"model_type": "qwen2", "hidden_size": 96, "intermediate_size": 160, "num_attention_heads": 6, '
        '"num_key_value_heads": 2}')
    path = write(tmp_path, GOOD.replace('{name = "t.32x48", K = 32, N = 48}', '"models/q"'))
    monkeypatch.chdir(tmp_path.parent)
    suite = load_suite(path)
    assert [(s.name, s.K, s.N, s.per_block) for s in suite.grids[0].layers] == [
        ("q.attn", 96, 96, 2), ("q.kv", 96, 32, 2), ("q.up", 96, 160, 2), ("q.down", 160, 96, 1)]
    (tmp_path / "models" / "q" / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 96}')
    msg = run_cli_error(path)
    assert "layer `models/q`" in msg and "config.json" in msg and "intermediate_size" in msg


def test_a_named_shapes_name_on_other_dims_exits_2_inline_or_from_a_model_directory(tmp_path):
    """Rows carry the layer's name: 'llama-7b.up' on 96 x 160 would pass for the real one, so it is refused."""
    msg = run_cli_error(write(tmp_path, GOOD.replace('{name = "t.32x48", K = 32, N = 48}',
                                                     '{name = "llama-7b.up", K = 96, N = 160}')))
    assert "inline layer `llama-7b.up` (K=96, N=160)" in msg and "(K=4096, N=11008)" in msg
    (tmp_path / "llama-7b").mkdir()
    (tmp_path / "llama-7b" / "config.json").write_text(
        '{"hidden_size": 96, "intermediate_size": 160, "num_attention_heads": 6}')
    msg = run_cli_error(write(tmp_path, GOOD.replace('{name = "t.32x48", K = 32, N = 48}', f'"{tmp_path / "llama-7b"}"')))
    assert "from model directory" in msg and "`llama-7b.attn` (K=96, N=96)" in msg and "rename the directory" in msg


def test_empty_sweep_says_which_axis_is_empty(tmp_path):
    msg = run_cli_error(write(tmp_path, GOOD.replace("tokens = [16]", "tokens = []")))
    assert "empty sweep: axis `tokens` in [defaults]" in msg and "line 6" in msg


def test_missing_axis_and_missing_grid_are_explained(tmp_path):
    msg = run_cli_error(write(tmp_path, GOOD.replace("tokens = [16]", "")))
    assert "missing axis `tokens` in [[grid]] #1" in msg
    msg = run_cli_error(write(tmp_path, GOOD.split("[[grid]]")[0]))
    assert "has no [[grid]] table" in msg


def test_inline_layer_reusing_a_named_shapes_name_with_other_dims_exits_2(tmp_path):
    """Rows carry the layer name: 'llama-7b.attn' at 64x64 would pass for the real 4096x4096 layer."""
    msg = run_cli_error(write(tmp_path, GOOD.replace('name = "t.32x48", K = 32, N = 48', 'name = "llama-7b.attn", K = 64, N = 64')))
    assert "inline layer `llama-7b.attn` (K=64, N=64)" in msg and "line 8" in msg
    assert "(K=4096, N=4096)" in msg
    same = load_suite(write(tmp_path, GOOD.replace('name = "t.32x48", K = 32, N = 48', 'name = "llama-7b.attn", K = 4096, N = 4096')))
    assert [(s.name, s.K, s.N) for s in same.grids[0].layers] == [("llama-7b.attn", 4096, 4096)]


def test_inline_layer_with_unknown_key_is_explained(tmp_path):
    msg = run_cli_error(write(tmp_path, GOOD.replace("K = 32", "k = 32")))
    assert "`layers`" in msg and "unknown key `k`" in msg and "name, K, N, per_block" in msg


def test_invalid_toml_and_unknown_suite_name_exit_2(tmp_path):
    msg = run_cli_error(write(tmp_path, GOOD.replace("ranks = [4, 8]", "ranks = [4, 8")))
    assert "not valid TOML" in msg
    result = CliRunner().invoke(app, ["run", "no-such-suite", "--dry-run"])
    assert result.exit_code == 2 and "known suites: " in result.stderr and "smoke" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a CPU-only machine gives")
def test_cuda_suite_on_a_cpu_machine_exits_2_with_the_fix(tmp_path):
    path = write(tmp_path, GOOD.replace('device = "cpu"', 'device = "cuda"'))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and 'device = "auto"' in result.stderr
    message = " ".join(result.stderr.split())  # rich wraps the paragraph
    assert "timings need a GPU" in message and "`falqon-bench run smoke`" in message, message
    assert not (tmp_path / "r").exists(), "nothing written before the device check"


def test_a_suite_file_that_is_not_utf8_exits_2(tmp_path):
    path = tmp_path / "x.toml"
    path.write_bytes(GOOD.encode("utf-16"))  # e.g. saved as UTF-16 by an editor
    assert "cannot be read as a UTF-8 TOML suite file" in run_cli_error(path)


def test_find_key_line_looks_inside_the_right_table():
    text = "name = 'a'\n[timing]\ncache = 'x'\n[[grid]]\nranks = [1]\n[[grid]]\n# c\nranks = [2]\n"
    assert find_key_line(text, "grid", 1, "ranks") == 8
    assert find_key_line(text, "grid", 0, "ranks") == 5
    assert find_key_line(text, "timing", None, "cache") == 3
    assert find_key_line(text, None, None, "name") == 1
    assert find_key_line(text, "grid", 0, "methods") == 4  # absent key: the table header


def test_known_suites_finds_the_shipped_files():
    assert {"smoke", "overhead", "methods", "ranks", "e2e"} <= set(known_suites())
    with pytest.raises(BenchInputError, match="known suites"):
        load_suite("nope")


def test_validate_suite_dispatches_every_kind_and_names_the_allowed_ones():
    """validate_suite (not only load_suite) takes every suite kind; an unknown kind lists the allowed ones."""
    e2e = {"kind": "e2e", "name": "x", "device": "cpu", "model": "tiny-llama", "seq_len": 8, "batch": 1, "steps": 3,
           "rank": 4, "lr": 1e-3, "methods": ["bf16_lora"]}
    assert validate_suite(e2e).kind == "e2e"
    with pytest.raises(BenchInputError, match="unknown suite kind 'speed'.*allowed: layers, e2e, accuracy"):
        validate_suite({**e2e, "kind": "speed"})


@pytest.mark.parametrize(
    "method,options,expected",
    [
        ("fp8_lora", "{fast_accum = false}", "fast_accum of method fp8_lora; it takes no options"),
        ("falqon", '{rounding_mode = "stochastic"}', "rounding_mode of method falqon; allowed: topk"),
        ("falqon", '{topk = "16"}', "falqon option topk must be an integer, got '16'"),
        ("bf16_lora", '{freeze_a = "yes"}', "freeze_a must be true or false"),
        ("fp6_lora", '{fp6_format = "e9m9"}', "fp6_format='e9m9'; allowed: e3m2, e2m3"),
        ("fp6_lora", '{fp6_backend = "fp7"}', "fp6_backend='fp7'; allowed: auto, fpx, floatx"),
    ],
)
def test_an_option_the_method_does_not_read_exits_2_instead_of_being_recorded_as_applied(tmp_path, method, options, expected):
    text = GOOD.replace('methods = ["bf16_linear"]', f'methods = ["{method}"]\noptions = {{{method} = {options}}}')
    message = run_cli_error(write(tmp_path, text))
    assert expected in message and "line 11" in message
