"""FALQON's deployable result: the fp8 backbone rows and their scale, no post-training quantization.

`save_falqon` writes, for every FalqonLinear named NAME, the safetensors entries NAME.weight (N x K
float8_e4m3fn, the backbone rows melded[:N]), NAME.scale (0-dim fp32 dequant scale) and NAME.bias (if
any), with metadata: format, dtype "e4m3", and per layer K, N, rank (JSON). The adapter rows A8 and B
are training state and are not exported. `load_falqon` reads them back bit for bit; `Fp8Linear` and
`apply_falqon_export` rebuild an inference model from the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from falqon_core import fp8
from falqon_core.kernels import quantize_fp8
from falqon_core.methods.falqon import falqon_layers, fp8_matmul_nt

EXPORT_FORMAT = "falqon-fp8-v1"


def _key(layer_name: str, field: str) -> str:
    """safetensors key of one layer's field; a model that is itself one layer has the bare field names."""
    return f"{layer_name}.{field}" if layer_name else field


def save_falqon(model: nn.Module, path: str | Path) -> Path:
    """Write every FalqonLinear's fp8 backbone, scale and bias to one safetensors file; returns the path."""
    layers = falqon_layers(model)
    if not layers:
        raise ValueError("save_falqon: the model has no FalqonLinear layer (convert it with the 'falqon' method first)")
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, dict[str, int]] = {}
    for name, layer in layers:
        tensors[_key(name, "weight")] = layer.backbone_fp8.detach().cpu().contiguous()
        tensors[_key(name, "scale")] = layer.scale.detach().float().cpu().contiguous()
        if layer.bias is not None:
            tensors[_key(name, "bias")] = layer.bias.detach().cpu().contiguous()
        shapes[name] = {"K": layer.in_features, "N": layer.out_features, "rank": layer.rank}
    metadata = {"format": EXPORT_FORMAT, "dtype": "e4m3", "scaling": "tensorwise", "layers": json.dumps(shapes)}
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_falqon(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Layer name -> (weight N x K float8_e4m3fn, scale 0-dim fp32, bias or None), exactly as saved."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != EXPORT_FORMAT:
            found = metadata.get("format")
            raise ValueError(f"{path}: not a FALQON export (format {found!r}, expected {EXPORT_FORMAT!r})")
        keys = set(f.keys())
        layers = {}
        for name, shape in json.loads(metadata["layers"]).items():
            weight = f.get_tensor(_key(name, "weight"))
            if weight.dtype != fp8.E4M3 or tuple(weight.shape) != (shape["N"], shape["K"]):
                raise ValueError(
                    f"{path}: {name}.weight is {weight.dtype} {tuple(weight.shape)}, "
                    f"expected float8_e4m3fn ({shape['N']}, {shape['K']})"
                )
            bias = f.get_tensor(_key(name, "bias")) if _key(name, "bias") in keys else None
            layers[name] = (weight, f.get_tensor(_key(name, "scale")), bias)
    return layers


class Fp8Linear(nn.Module):
    """Inference layer for an exported backbone: y = e4m3(x) . W8^T * (s_x * s) + bias, in x's dtype."""

    def __init__(self, weight_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x8, x_scale = quantize_fp8(x.reshape(-1, self.in_features).contiguous(), fp8.E4M3, "tensorwise")
        out = fp8_matmul_nt(x8, x_scale, self.weight_fp8, self.scale, torch.bfloat16).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def apply_falqon_export(model: nn.Module, path: str | Path) -> nn.Module:
    """Replace each module of `model` named in the export (nn.Linear or FalqonLinear) by an Fp8Linear."""
    layers = load_falqon(path)
    device = next(iter(model.parameters()), torch.empty(0)).device
    for name, (weight, scale, bias) in layers.items():
        try:
            model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"{path}: layer {name!r} is not in the model") from err
        layer = Fp8Linear(weight.to(device), scale.to(device), None if bias is None else bias.to(device))
        if not name:
            return layer
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    return model
