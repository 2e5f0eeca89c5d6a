"""Model sources: named configs build offline; a local directory loads only safetensors and never remote code."""

from __future__ import annotations

import json

import pytest
import torch

from falqon_bench.data.errors import BenchInputError
from falqon_bench.suites.models import check_model_dir, llama_config, make_model


def _save_tiny(tmp_path, safe: bool):
    """A tiny model saved as safetensors, or as a pickled pytorch_model.bin (what older checkpoints ship)."""
    model = make_model("tiny-llama", torch.device("cpu"), torch.float32, seed=3)
    if safe:
        model.save_pretrained(tmp_path)
    else:
        model.config.save_pretrained(tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    return model


def test_safetensors_directory_loads_the_same_weights(tmp_path):
    saved = _save_tiny(tmp_path, safe=True)
    loaded = make_model(str(tmp_path), torch.device("cpu"), torch.float32)
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_more_layers_than_the_directory_holds_is_refused_not_filled_with_random_layers(tmp_path):
    _save_tiny(tmp_path, safe=True)  # tiny-llama: 2 decoder layers
    assert len(make_model(str(tmp_path), torch.device("cpu"), torch.float32, num_layers=1).model.layers) == 1
    with pytest.raises(BenchInputError, match="layers = 3 exceeds the 2 decoder layers"):
        make_model(str(tmp_path), torch.device("cpu"), torch.float32, num_layers=3)


def test_pickled_only_directory_is_refused_unless_allowed(tmp_path):
    saved = _save_tiny(tmp_path, safe=False)
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(BenchInputError, match="pickled weights .*--allow-pickle"):
        make_model(str(tmp_path), torch.device("cpu"), torch.float32)
    loaded = make_model(str(tmp_path), torch.device("cpu"), torch.float32, allow_pickle=True)
    assert torch.equal(saved.lm_head.weight, loaded.lm_head.weight)


def test_remote_code_is_refused_even_with_allow_pickle(tmp_path):
    _save_tiny(tmp_path, safe=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(BenchInputError, match="remote code"):
        check_model_dir(tmp_path, allow_pickle=True)


def test_directory_without_config_or_weights_is_refused(tmp_path):
    with pytest.raises(BenchInputError, match="no config.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # no weights, and nothing to build random ones from
    with pytest.raises(BenchInputError, match="no weights .* model_type = None is not a causal LM"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')  # ships with transformers, but no causal LM
    with pytest.raises(BenchInputError, match="model_type = 'vit' is not a causal LM"):
        check_model_dir(tmp_path)


def _config_only(tmp_path, config_class, **extra):
    config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, **extra).to_json_file(tmp_path / "config.json")
    return str(tmp_path)


def test_config_only_directory_builds_that_architecture_with_seeded_random_weights_at_any_depth(tmp_path):
    """A user's config.json alone (here Qwen2's, whose per-layer `layer_types` must follow the depth) is a model:
    built with transformers' own code, random weights from the seed, deeper or shallower than the file says."""
    from transformers import Qwen2Config

    spec = _config_only(tmp_path, Qwen2Config)
    a = make_model(spec, torch.device("cpu"), torch.float32, num_layers=3, seed=1)
    b = make_model(spec, torch.device("cpu"), torch.float32, num_layers=3, seed=1)
    c = make_model(spec, torch.device("cpu"), torch.float32, num_layers=1, seed=2)
    assert type(a).__name__ == "Qwen2ForCausalLM" and len(a.model.layers) == 3 and len(c.model.layers) == 1
    assert len(a.config.layer_types) == 3
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    tokens = torch.randint(0, 256, (1, 8))
    assert torch.isfinite(a(input_ids=tokens, labels=tokens).loss)


def test_projection_targets_are_llamas_seven_or_every_projection_of_another_architecture(tmp_path):
    """LoRA goes on every linear projection (not the output head): LLaMA's seven names exactly, in their usual order,
    for a LLaMA-architecture model; Phi-3's fused qkv_proj and gate_up_proj too, none left frozen by a name list."""
    from transformers import Phi3Config

    from falqon_core.convert import LLAMA_TARGET_MODULES, projection_targets

    llama = make_model("tiny-llama", torch.device("cpu"), torch.float32)
    assert projection_targets(llama) == LLAMA_TARGET_MODULES
    phi3 = make_model(_config_only(tmp_path, Phi3Config, pad_token_id=0), torch.device("cpu"), torch.float32)
    assert projection_targets(phi3) == ("o_proj", "down_proj", "gate_up_proj", "qkv_proj")


def test_unknown_name_lists_the_allowed_models():
    with pytest.raises(BenchInputError, match="allowed: tiny-llama, small-llama"):
        llama_config("gpt-9")
    assert llama_config("llama-70b", num_layers=2).num_hidden_layers == 2


def test_models_for_fine_tuning_build_no_kv_cache():
    model = make_model("tiny-llama", torch.device("cpu"), torch.float32)
    tokens = torch.randint(0, 256, (2, 8))
    out = model(input_ids=tokens, labels=tokens)
    assert model.config.use_cache is False and out.past_key_values is None


def test_every_named_layer_family_is_a_named_model_with_those_layer_widths():
    """A suite that names mistral-7b's layers can fine-tune mistral-7b whole: each family of the layer table builds
    as LLaMA blocks whose projections have the table's widths (Mistral's GQA kv 4096 -> 1024, up 14336)."""
    from falqon_bench.suites.layers import MODEL_NAMES as LAYER_FAMILIES
    from falqon_bench.suites.layers import named_layers

    table = named_layers()
    for family in LAYER_FAMILIES:
        config = llama_config(family, num_layers=1)
        assert config.model_type == "llama" and not hasattr(config, "sliding_window"), family
        kv_width = config.num_key_value_heads * config.head_dim
        assert (table[f"{family}.up"].K, table[f"{family}.up"].N) == (config.hidden_size, config.intermediate_size)
        assert (table[f"{family}.attn"].K, table[f"{family}.attn"].N) == (config.hidden_size, config.hidden_size)
        kv = table.get(f"{family}.kv")
        assert kv is None or (kv.K, kv.N) == (config.hidden_size, kv_width), family
    mistral = llama_config("mistral-7b", num_layers=1)
    assert (mistral.num_key_value_heads, mistral.intermediate_size, mistral.vocab_size) == (8, 14336, 32000)
