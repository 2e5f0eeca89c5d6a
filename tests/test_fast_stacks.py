"""The fast stacks (falqon_bench.measure.fast_stacks): liger-kernel's patches keep the methods' layers and leave other
models alone, the patched model computes the same loss and adapter gradients (GPU), and liger and Unsloth
are refused with a one-line reason where they cannot run."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect

import pytest
import torch

from falqon_bench.measure import fast_stacks
from falqon_bench.data.errors import BenchInputError
from falqon_bench.suites.models import load_model_dir, make_model
from falqon_core.convert import LLAMA_TARGET_MODULES, convert_model
from falqon_core.methods import AdapterConfig

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
needs_liger = pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel is not installed (pip install -e '.[fast]')")
BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significand bits)


def tiny(device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    return make_model("tiny-llama", torch.device(device), torch.bfloat16, seed=seed)


def module_types(model: torch.nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


def test_liger_is_refused_with_what_to_do_where_it_cannot_run():
    reason = fast_stacks.liger_unavailable_reason("cpu")
    assert reason is not None
    if HAS_LIGER:
        assert "needs a CUDA GPU" in reason
    else:
        assert "pip install" in reason and "liger-kernel" in reason
    with pytest.raises(BenchInputError, match="liger = true is not possible here"):
        fast_stacks.apply_liger(tiny())


@needs_liger
@pytest.mark.parametrize("method", ["bf16_lora", "falqon"])
def test_liger_then_conversion_keeps_the_methods_layers(method):
    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP, liger_rotary_pos_emb

    config = AdapterConfig(rank=16, target_modules=LLAMA_TARGET_MODULES)
    plain, _ = convert_model(tiny(), method, config)
    patched_llama = tiny()
    fast_stacks.patch_llama_with_liger(patched_llama)
    patched, _ = convert_model(patched_llama, method, config)

    assert module_types(patched) == module_types(plain)  # every projection is the method's layer
    assert fast_stacks.liger_patches_of(patched_llama) == fast_stacks.LIGER_PATCHES
    assert patched_llama.forward.__func__.__module__.startswith("liger_kernel")  # the fused lm_head + loss
    assert patched_llama.model.norm.forward.__func__ is LigerRMSNorm.forward
    for layer in patched_llama.model.layers:
        assert layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward
        assert layer.input_layernorm.forward.__func__ is LigerRMSNorm.forward
        rope_forward = layer.self_attn.forward.__func__.__wrapped__
        assert rope_forward.__globals__["apply_rotary_pos_emb"] is liger_rotary_pos_emb


@needs_liger
def test_liger_leaves_transformers_and_later_models_unpatched():
    from transformers.models.llama import modeling_llama

    names = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")
    before = {name: getattr(modeling_llama, name) for name in names}
    class_forward = modeling_llama.LlamaForCausalLM.forward
    fast_stacks.patch_llama_with_liger(tiny())

    assert {name: getattr(modeling_llama, name) for name in names} == before
    assert modeling_llama.LlamaForCausalLM.forward is class_forward
    later = tiny()
    assert "forward" not in vars(later) and "forward" not in vars(later.model.norm)
    assert "forward" not in vars(later.model.layers[0].mlp) and "forward" not in vars(later.model.layers[0].self_attn)


@needs_liger
def test_liger_refuses_a_model_already_converted():
    peft_model, _ = convert_model(tiny(), "bf16_lora", AdapterConfig(rank=16, target_modules=LLAMA_TARGET_MODULES))
    with pytest.raises(BenchInputError, match="before a method converts it"):
        fast_stacks.patch_llama_with_liger(peft_model)


@needs_liger
def test_liger_refuses_a_converted_lm_head_its_fused_loss_would_skip():
    model = tiny()
    model.lm_head = torch.nn.Sequential(model.lm_head)  # any module that is not a plain nn.Linear
    with pytest.raises(BenchInputError, match="lm_head must be a plain nn.Linear"):
        fast_stacks.patch_llama_with_liger(model)


def test_an_old_liger_is_refused_with_the_version_to_install(monkeypatch):
    monkeypatch.setattr(fast_stacks, "_installed_version", lambda name: "0.5.10")
    reason = fast_stacks.liger_unavailable_reason("cuda")
    assert reason.startswith(f"liger-kernel 0.5.10 is older than {fast_stacks.LIGER_MIN_VERSION}")
    assert "pip install" in reason


def test_attention_with_a_swapped_rope_global_runs_it_and_computes_the_same_output():
    """The per-model RoPE patch: a copy of LlamaAttention.forward (through transformers' deprecate_kwarg
    wrapper) that calls the given function; here transformers' own RoPE, counted, so the loss is identical."""
    from transformers.models.llama import modeling_llama

    calls = []

    def counted_rope(*args, **kwargs):
        calls.append(1)
        return modeling_llama.apply_rotary_pos_emb(*args, **kwargs)

    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = tiny()(input_ids=tokens, labels=tokens).loss
    model = tiny()
    for layer in model.model.layers:
        forward = fast_stacks.function_with_global(type(layer.self_attn).forward, "apply_rotary_pos_emb", counted_rope)
        layer.self_attn.forward = forward.__get__(layer.self_attn)
    loss = model(input_ids=tokens, labels=tokens).loss

    assert len(calls) == len(model.model.layers)
    assert torch.equal(loss, reference)
    # transformers' module is untouched (its forward may sit under one decorator or several, by version)
    assert inspect.unwrap(modeling_llama.LlamaAttention.forward).__globals__["apply_rotary_pos_emb"] is not counted_rope
    assert modeling_llama.apply_rotary_pos_emb is not counted_rope


def test_function_with_global_refuses_a_function_that_never_reads_the_global():
    with pytest.raises(BenchInputError, match="does not use the global"):
        fast_stacks.function_with_global(lambda x: x, "apply_rotary_pos_emb", None)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["bf16_lora", "falqon"])
def test_liger_patched_model_matches_unpatched_loss_and_adapter_grads_within_bf16(method):
    """Same weights, same tokens: loss and the gradient of every trainable adapter agree within bf16 rounding.

    The two paths round different intermediates to bf16 (RMSNorm, SwiGLU, RoPE outputs; the loss over chunks
    of the vocabulary): about 4 differently rounded values per layer plus 2 at the end, each off by at most
    one bf16 unit, so the loss may differ by (4 L + 2) u |loss| and the gradients (twice the roundings, forward
    and backward) by 2 (4 L + 2) u of their norm.
    """
    if fast_stacks.liger_unavailable_reason("cuda") is not None:
        pytest.skip(fast_stacks.liger_unavailable_reason("cuda"))
    config = AdapterConfig(rank=16, target_modules=LLAMA_TARGET_MODULES)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()

    def loss_and_grads(with_liger: bool):
        model = tiny("cuda")
        if with_liger:
            fast_stacks.apply_liger(model)
        converted, method_obj = convert_model(model, method, config)
        params = method_obj.trainable_parameters(converted)
        with torch.random.fork_rng(devices=[0]):  # nonzero B so every adapter has a gradient
            torch.manual_seed(1)
            with torch.no_grad():
                for p in params:
                    p.add_(0.02 * torch.randn_like(p))
        loss = converted(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss.detach().float(), [p.grad.detach().float() for p in params]

    ref_loss, ref_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    roundings = 4 * 2 + 2  # tiny-llama has 2 layers
    assert abs(loss - ref_loss) <= roundings * BF16_UNIT * abs(ref_loss)
    assert len(grads) == len(ref_grads) > 0
    for g, ref in zip(grads, ref_grads):
        assert torch.linalg.vector_norm(g - ref) <= 2 * roundings * BF16_UNIT * torch.linalg.vector_norm(ref) + 1e-6


def test_unsloth_baselines_are_refused_with_a_precise_reason_here(tmp_path):
    reason = fast_stacks.unsloth_unavailable_reason("cpu")
    if reason is None:
        pytest.skip("unsloth can run here")
    assert any(words in reason for words in ("not installed", "requires", "needs a CUDA GPU", "imports"))
    for baseline in fast_stacks.UNSLOTH_BASELINES:
        with pytest.raises(BenchInputError, match=f"{baseline} is not possible here"):
            fast_stacks.build_unsloth_model(baseline, tiny(), rank=16, max_seq_length=64, workdir=tmp_path)


def test_an_installed_unsloth_is_refused_for_its_pin_then_a_missing_module_then_the_cpu(monkeypatch):
    import transformers

    real_version, real_find_spec = fast_stacks._installed_version, importlib.util.find_spec
    monkeypatch.setattr(fast_stacks, "_installed_version", lambda name: "2026.10.9" if name == "unsloth" else real_version(name))
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: [f"transformers<{transformers.__version__}"])
    assert fast_stacks.unsloth_unavailable_reason("cpu").startswith("unsloth 2026.10.9 requires transformers<")

    monkeypatch.setattr(importlib.metadata, "requires", lambda name: ["transformers>=4", "torch>=2"])
    unsloth_modules = set(fast_stacks.UNSLOTH_IMPORTS)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in unsloth_modules else real_find_spec(name, *a))
    missing = fast_stacks.unsloth_unavailable_reason("cpu")
    assert missing.startswith("unsloth 2026.10.9 imports unsloth_zoo, trl, datasets")
    assert "pip install unsloth_zoo trl" in missing

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in unsloth_modules else real_find_spec(name, *a))
    assert "unsloth needs a CUDA GPU" in fast_stacks.unsloth_unavailable_reason("cpu")


def test_unknown_unsloth_baseline_lists_the_allowed_names(tmp_path):
    with pytest.raises(BenchInputError, match="allowed: unsloth_lora, unsloth_qlora"):
        fast_stacks.build_unsloth_model("unsloth_fp8", tiny(), rank=16, max_seq_length=64, workdir=tmp_path)


def test_unmet_pin_names_the_package_its_pin_and_the_installed_version():
    import transformers

    requirements = [
        f"transformers<{transformers.__version__}",
        'xformers>=0.0.27; sys_platform == "win32"',
        'torch>=99; extra == "studio"',
    ]
    message = fast_stacks.unmet_pin("unsloth 2026.10.9", requirements, fast_stacks.UNSLOTH_PINNED)
    assert message == (
        f"unsloth 2026.10.9 requires transformers<{transformers.__version__}; "
        f"this environment has {transformers.__version__}"
    )
    assert fast_stacks.unmet_pin("x", [f"transformers<={transformers.__version__}", "torch>=2"], ("torch", "transformers")) is None


def test_saved_model_dir_loads_back_with_the_same_logits_and_a_matching_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    model = tiny()
    root = fast_stacks.save_model_dir(model, tmp_path / "model")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in root.iterdir()}
    loaded = load_model_dir(root, torch.device("cpu"), torch.bfloat16)
    tokens = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits)
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer("t5 t255")["input_ids"][-2:] == [5, 255]


def test_a_model_for_torch_compile_keeps_its_rope(monkeypatch):
    """Compiled modes apply liger without its per-model RoPE patch (a copy of the attention's globals breaks
    torch.compile's resume after a nested graph break); the row's liger_patches says so."""
    pytest.importorskip("liger_kernel")
    from falqon_bench.suites.models import make_model

    model = make_model("tiny-llama", torch.device("cpu"), torch.float32, num_layers=1, seed=0)
    forward_before = model.model.layers[0].self_attn.forward
    fast_stacks.patch_llama_with_liger(model, rope=False)
    assert "rope" not in fast_stacks.liger_patches_of(model)
    assert set(fast_stacks.liger_patches_of(model)) == set(fast_stacks.LIGER_PATCHES) - {"rope"}
    assert model.model.layers[0].self_attn.forward == forward_before
