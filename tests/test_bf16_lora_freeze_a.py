"""bf16_lora's freeze_a option (LoRA-FA): A keeps its init and never trains, B does; bad options fail clearly;
the accuracy suites carry the labelled entry."""

from pathlib import Path

import pytest
import torch

from falqon_core.convert import LLAMA_TARGET_MODULES, convert_model
from falqon_core.methods import AdapterConfig, get_method
from falqon_core.methods._lora_common import gemm_flops, lora_layers

from falqon_bench.measure.accuracy_run import lm_loss
from falqon_bench.suites.models import make_model

REPO = Path(__file__).resolve().parents[1]


def _train(options: dict, steps: int = 3):
    """tiny-llama with bf16_lora, `steps` AdamW steps as the accuracy runner takes them; A and B before and after."""
    model = make_model("tiny-llama", torch.device("cpu"), torch.bfloat16, num_layers=1, seed=0)
    model, method = convert_model(model, "bf16_lora", AdapterConfig(rank=4, target_modules=LLAMA_TARGET_MODULES, options=options))
    layers = [layer for _, layer in lora_layers(model)]
    a0 = [p.detach().clone() for layer in layers for p in layer.lora_A.parameters()]
    b0 = [p.detach().clone() for layer in layers for p in layer.lora_B.parameters()]
    optimizer = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, int(model.config.vocab_size), (2, 16), generator=g)
        lm_loss(model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    a1 = [p.detach() for layer in layers for p in layer.lora_A.parameters()]
    b1 = [p.detach() for layer in layers for p in layer.lora_B.parameters()]
    return layers, a0, a1, b0, b1


def test_freeze_a_keeps_a_at_its_init_and_trains_b():
    layers, a0, a1, b0, b1 = _train({"freeze_a": True})
    assert layers and all(not p.requires_grad for layer in layers for p in layer.lora_A.parameters())
    assert all(torch.equal(x, y) for x, y in zip(a0, a1))
    assert all(not torch.equal(x, y) for x, y in zip(b0, b1))
    assert all(float(x.abs().max()) > 0 for x in a0)  # A is PEFT's Kaiming init, not zeros


def test_without_freeze_a_both_a_and_b_train():
    for options in ({}, {"freeze_a": False}):
        _, a0, a1, b0, b1 = _train(options)
        assert all(not torch.equal(x, y) for x, y in zip(a0, a1))
        assert all(not torch.equal(x, y) for x, y in zip(b0, b1))


def test_freeze_a_starts_from_the_same_a_as_plain_bf16_lora():
    """Same seed, same init: the only difference between the two baselines is whether A trains."""
    _, a_frozen, _, _, _ = _train({"freeze_a": True}, steps=0)
    _, a_plain, _, _, _ = _train({}, steps=0)
    assert all(torch.equal(x, y) for x, y in zip(a_frozen, a_plain))


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"freeze_a": "yes"}, "freeze_a must be true or false, got 'yes'"),
        ({"freeze_a": 1}, "freeze_a must be true or false, got 1"),
        ({"freeze_b": True}, "unknown option(s) freeze_b; allowed: freeze_a"),
    ],
)
def test_bad_options_raise_a_clear_value_error(options, expected):
    model = make_model("tiny-llama", torch.device("cpu"), torch.bfloat16, num_layers=1, seed=0)
    with pytest.raises(ValueError) as err:
        convert_model(model, "bf16_lora", AdapterConfig(rank=4, target_modules=LLAMA_TARGET_MODULES, options=options))
    assert expected in str(err.value)
    with pytest.raises(ValueError):
        get_method("bf16_lora").step_cost(64, 128, 4, 32, options)


def test_step_cost_drops_the_da_gemm_and_a_update():
    K, N, r, M = 4096, 11008, 16, 4096
    method = get_method("bf16_lora")
    plain, frozen = method.step_cost(K, N, r, M), method.step_cost(K, N, r, M, {"freeze_a": True})
    assert plain.gemm_flops["bf16"] - frozen.gemm_flops["bf16"] == gemm_flops(M, r, K) == 2 * M * r * K
    assert plain.quant_bytes - frozen.quant_bytes == 3 * 2 * r * K
    assert method.step_cost(K, N, r, M, {"freeze_a": False}) == plain


@pytest.mark.parametrize("suite", ["accuracy-text.toml", "accuracy-synthetic.toml"])
def test_accuracy_suites_list_the_frozen_a_baseline_right_after_the_falqon_variants(suite):
    """(The runner groups points by method, one worker each: these run right after bf16_lora's own grid.)"""
    from falqon_bench.suites.suite import load_suite
    from falqon_bench.suites.sweep import expand_suite

    loaded = load_suite(REPO / "suites" / suite)
    labels = [m if isinstance(m, str) else m["label"] for m in loaded.spec["methods"]]
    i = labels.index("bf16_lora+frozenA")
    assert labels[i - 1].startswith("falqon+") and not any(label.startswith("falqon") for label in labels[i + 1:])
    frozen = [p for p in expand_suite(loaded) if p["options"]["label"] == "bf16_lora+frozenA"]
    assert len(frozen) == 2
    assert all(p["method"] == "bf16_lora" and p["method_options"] == {"freeze_a": True} for p in frozen)
