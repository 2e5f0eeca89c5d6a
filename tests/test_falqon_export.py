"""FALQON export: the fp8 backbone, its scale and bias survive safetensors bit for bit and serve inference."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from falqon_core import fp8
from falqon_core.export import apply_falqon_export, load_falqon, save_falqon
from falqon_core.methods import AdapterConfig, get_method
from falqon_core.training import attach_falqon_hook


def trained_model(steps: int = 3) -> nn.Module:
    """A two-layer model (one layer with bias, one without) after a few FALQON steps, so W8 moved off init."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 48, bias=False))
    method = get_method("falqon")
    model = method.convert(model, AdapterConfig(rank=16))
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=0.1)
    attach_falqon_hook(opt, model)
    x = torch.randn(32, 64)
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    return model


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = trained_model()
    path = save_falqon(model, tmp_path / "falqon.safetensors")
    loaded = load_falqon(path)
    assert set(loaded) == {"0", "2"}
    for name, layer in (("0", model[0]), ("2", model[2])):
        weight, scale, bias = loaded[name]
        assert weight.dtype == fp8.E4M3 and weight.shape == (layer.out_features, layer.in_features)
        assert torch.equal(weight.view(torch.uint8), layer.backbone_fp8.view(torch.uint8))
        assert torch.equal(scale.view(torch.int32), layer.scale.view(torch.int32))
        if layer.bias is None:
            assert bias is None
        else:
            assert torch.equal(bias.view(torch.int16), layer.bias.detach().view(torch.int16))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["dtype"] == "e4m3"
    assert json.loads(meta["layers"]) == {"0": {"K": 64, "N": 96, "rank": 16}, "2": {"K": 96, "N": 48, "rank": 16}}


def test_model_rebuilt_from_export_gives_the_same_forward_output(tmp_path):
    """Same e4m3(x), same W8 and scale: the N-column GEMM may differ from the melded (N+r)-column GEMM only
    in fp32 accumulation order, which can move the bf16-rounded output by one bf16 ulp (<= 2^-7 relative)."""
    model = trained_model()
    path = save_falqon(model, tmp_path / "falqon.safetensors")
    fresh = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 48, bias=False))
    rebuilt = apply_falqon_export(fresh, path)
    x = torch.randn(4, 8, 64)
    with torch.no_grad():
        want, got = model(x), rebuilt(x)
    assert got.shape == want.shape == (4, 8, 48)
    assert ((got - want).abs() <= 2.0**-7 * want.abs() + 1e-6).all()


def test_load_rejects_a_file_that_is_not_a_falqon_export(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a FALQON export"):
        load_falqon(path)


def test_save_refuses_a_model_without_falqon_layers(tmp_path):
    with pytest.raises(ValueError, match="no FalqonLinear"):
        save_falqon(nn.Linear(4, 4), tmp_path / "x.safetensors")
