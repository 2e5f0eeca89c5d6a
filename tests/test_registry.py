"""The method registry: every method describes itself, unknown names fail with the allowed list, and the
seven methods of the README's Methods table are all present."""

from __future__ import annotations

import pytest
import torch

from falqon_core.convert import convert_model
from falqon_core.methods import AdapterConfig, Method, MethodUnavailable, UnknownMethodError, get_method, method_names
from falqon_core.methods.base import StepCost

README_METHODS = {"bf16_lora", "qlora_nf4", "fp8_lora", "fp8_base_lora", "fp6_lora", "halo_lora", "falqon"}


def shipped_method_names() -> list[str]:
    """Registered methods that live in falqon_core.methods (other tests register throwaway ones)."""
    return [n for n in method_names() if type(get_method(n)).__module__.startswith("falqon_core.methods.")]


@pytest.mark.parametrize("name", shipped_method_names())
def test_every_method_describes_itself(name):
    method = get_method(name)
    assert isinstance(method, Method)
    assert method.name == name
    assert method.summary.strip() and method.built_on.strip()
    assert isinstance(method.needs_cuda, bool) and isinstance(method.supports_compile, bool)


@pytest.mark.parametrize("name", shipped_method_names())
def test_every_method_reports_a_step_cost(name):
    """GEMM FLOPs by precision ('fp8' / 'bf16') and non-negative bytes; more tokens never cost less."""
    small = get_method(name).step_cost(4096, 4096, 16, 1024)
    big = get_method(name).step_cost(4096, 4096, 16, 2048)
    assert isinstance(small, StepCost)
    assert set(small.gemm_flops) <= {"fp8", "bf16"} and sum(small.gemm_flops.values()) > 0
    assert small.quant_bytes >= 0
    assert sum(big.gemm_flops.values()) > sum(small.gemm_flops.values()) and big.quant_bytes >= small.quant_bytes


@pytest.mark.parametrize("name", shipped_method_names())
def test_every_method_gives_a_reason_or_none_for_cpu(name):
    reason = get_method(name).unavailable_reason("cpu")
    assert reason is None or (isinstance(reason, str) and reason.strip())


class _CudaOnly(Method):
    """A method whose only contract is needs_cuda (not registered: the registry is shared by every test)."""

    name = "cuda_only_probe"
    summary = built_on = "test"
    needs_cuda = True

    def convert(self, model, config):
        raise AssertionError("convert must not run on a device the method cannot use")

    def step_cost(self, K, N, rank, tokens, options=None):
        return StepCost({"bf16": 1.0}, 0.0)


def test_needs_cuda_refuses_the_cpu_before_convert_touches_the_model(monkeypatch):
    from falqon_core import convert as convert_module

    method = _CudaOnly()
    assert "needs a CUDA GPU" in method.unavailable_reason("cpu")
    with pytest.raises(MethodUnavailable, match="cuda_only_probe needs a CUDA GPU"):
        method.check_runnable("cpu")
    monkeypatch.setattr(convert_module, "get_method", lambda name: method)
    with pytest.raises(MethodUnavailable, match="needs a CUDA GPU"):
        convert_model(torch.nn.Linear(16, 16), "cuda_only_probe", AdapterConfig(rank=4))


def test_compile_is_refused_for_a_method_that_does_not_support_it():
    method = _CudaOnly()
    method.needs_cuda, method.supports_compile = False, False
    method.check_runnable("cpu")
    with pytest.raises(MethodUnavailable, match="does not support torch.compile"):
        method.check_runnable("cpu", compile=True)


@pytest.mark.parametrize("name", ["bf16_lora", "falqon", "halo_lora", "fp6_lora"])
def test_convert_leaves_no_state_on_the_method_that_step_cost_could_read(name):
    """step_cost depends on its arguments only: a convert with non-default options changes neither the
    method's attributes nor its cost (the registry hands every caller the same instance)."""
    method = get_method(name)
    before = method.step_cost(64, 96, 16, 32)
    options = {"falqon": {"topk": 2, "cache_weight_t": True}, "halo_lora": {"max_block": 32},
               "fp6_lora": {"fp6_backend": "floatx", "fp6_format": "e2m3"}}.get(name, {})  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False))
    method.convert(model, AdapterConfig(rank=16, options=options))
    assert vars(method) == {}, f"{name} keeps {sorted(vars(method))} from its last convert"
    assert method.step_cost(64, 96, 16, 32) == before
    cost_options = {"fp6_lora": {"fp6_backend": "fpx"}}.get(name, options)  # on CPU auto is floatx already
    if cost_options:
        assert method.step_cost(64, 96, 16, 32, cost_options) != before, "the options change the cost"


def test_unknown_method_name_lists_the_allowed_names():
    with pytest.raises(UnknownMethodError) as info:
        get_method("fp9_lora")
    message = str(info.value)
    assert "fp9_lora" in message
    for name in method_names():
        assert name in message


def test_convert_model_with_unknown_name_raises_unknown_method_error():
    with pytest.raises(UnknownMethodError, match="allowed: .*bf16_lora"):
        convert_model(torch.nn.Linear(16, 16), "nope", AdapterConfig(rank=4))


def test_all_readme_methods_and_bf16_linear_are_registered():
    """The seven methods of the README's Methods table plus the no-adapter bf16_linear floor."""
    missing = (README_METHODS | {"bf16_linear"}) - set(method_names())
    assert not missing, f"not registered: {sorted(missing)}"


def test_method_names_put_the_reference_methods_first():
    names = method_names()
    assert names[:2] == ["bf16_linear", "bf16_lora"]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", shipped_method_names())
def test_every_method_declares_the_options_it_reads(name):
    """Suites check options against `option_names` at load: an undeclared method would let any typo through."""
    from falqon_core.methods import check_method_options

    assert type(get_method(name)).option_names is not None
    check_method_options(name, {})
    with pytest.raises(ValueError, match=f"unknown option.*not_an_option of method {name}"):
        check_method_options(name, {"not_an_option": 1})
