"""Every registered method converts a tiny random LLaMA and trains one step on it: forward, loss.backward(),
AdamW, after_optimizer_step. Methods that cannot run on this device are skipped with their own reason."""

from __future__ import annotations

import pytest
import torch

from falqon_core.convert import LLAMA_TARGET_MODULES, convert_model
from falqon_core.methods import AdapterConfig, MethodUnavailable, get_method, method_names

HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB = 64, 128, 2, 4, 128
BATCH, SEQ = 2, 8
RANK = 16  # a multiple of 16 so torchao float8 accepts the adapters


def shipped_method_names() -> list[str]:
    """Every method module in falqon_core.methods (other tests register throwaway methods in the registry)."""
    return [n for n in method_names() if type(get_method(n)).__module__.startswith("falqon_core.methods.")]


def tiny_llama() -> torch.nn.Module:
    """LlamaForCausalLM, random init, no download: hidden 64, intermediate 128, 2 layers, 4 heads, vocab 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def train_one_step(method_name: str, device: str) -> None:
    reason = get_method(method_name).unavailable_reason(device)
    if reason:
        pytest.skip(reason)
    config = AdapterConfig(rank=RANK, target_modules=LLAMA_TARGET_MODULES)
    try:
        model, method = convert_model(tiny_llama().to(device), method_name, config)
    except MethodUnavailable as exc:
        if device == "cuda":  # e.g. a kernel's shape constraints that the tiny layers do not meet
            pytest.skip(str(exc))
        raise
    torch.manual_seed(1)
    embeds = torch.randn(BATCH, SEQ, HIDDEN, dtype=config.dtype, device=device, requires_grad=True)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    with torch.no_grad():
        logits_before = model(inputs_embeds=embeds).logits.float()

    loss = model(inputs_embeds=embeds, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert embeds.grad is not None and bool(torch.isfinite(embeds.grad).all()) and bool(embeds.grad.abs().sum() > 0)

    params = method.trainable_parameters(model)
    for p in params:
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
    if not params:
        assert method_name == "bf16_linear", f"{method_name} has no trainable parameters"
        return
    torch.optim.AdamW(params, lr=1e-2).step()
    method.after_optimizer_step(model)
    with torch.no_grad():
        logits_after = model(inputs_embeds=embeds).logits.float()
    assert bool(torch.isfinite(logits_after).all())
    assert not torch.equal(logits_before, logits_after), "one training step changed nothing"


@pytest.mark.parametrize("method_name", shipped_method_names())
def test_tiny_llama_trains_one_step_on_cpu(method_name):
    train_one_step(method_name, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("method_name", shipped_method_names())
def test_tiny_llama_trains_one_step_on_cuda(method_name):
    train_one_step(method_name, "cuda")
