"""One-shot probe of the GPU machine: versions and the library features falqon-bench relies on."""
import importlib.metadata as md
import time
import traceback

import torch

def check(name, fn):
    try:
        out = fn()
        print(f"OK   {name}: {out}")
    except Exception as e:  # the probe reports every failure and goes on
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:300]}")

for p in ["torch", "triton", "peft", "transformers", "torchao", "bitsandbytes", "nvidia-ml-py", "pandas", "typer", "rich", "pydantic", "scipy", "safetensors", "matplotlib", "pyarrow"]:
    try:
        print(p, md.version(p))
    except Exception:
        print(p, "missing")
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
dev = "cuda"
a = torch.randn(256, 256, device=dev)
def sm(rowwise):
    a8 = a.to(torch.float8_e4m3fn); b8 = a.to(torch.float8_e4m3fn).t()
    if rowwise:
        return torch._scaled_mm(a8, b8, scale_a=torch.ones(256, 1, device=dev), scale_b=torch.ones(1, 256, device=dev), out_dtype=torch.bfloat16).shape
    return torch._scaled_mm(a8, b8, scale_a=torch.tensor(1.0, device=dev), scale_b=torch.tensor(1.0, device=dev), out_dtype=torch.bfloat16).shape
check("scaled_mm tensorwise", lambda: sm(False))
check("scaled_mm rowwise", lambda: sm(True))
check("scaled_mm e5m2 x e4m3", lambda: torch._scaled_mm(a.to(torch.float8_e5m2), a.to(torch.float8_e4m3fn).t(), scale_a=torch.tensor(1.0, device=dev), scale_b=torch.tensor(1.0, device=dev), out_dtype=torch.bfloat16).shape)
check("scaled_mm e4m3 x e5m2", lambda: torch._scaled_mm(a.to(torch.float8_e4m3fn), a.to(torch.float8_e5m2).t(), scale_a=torch.tensor(1.0, device=dev), scale_b=torch.tensor(1.0, device=dev), out_dtype=torch.bfloat16).shape)
check("scaled_mm rowwise e5m2", lambda: torch._scaled_mm(a.to(torch.float8_e5m2), a.to(torch.float8_e4m3fn).t(), scale_a=torch.ones(256, 1, device=dev), scale_b=torch.ones(1, 256, device=dev), out_dtype=torch.bfloat16).shape)
def tao():
    from torchao.float8 import convert_to_float8_training
    m = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False)).to(dev, torch.bfloat16)
    convert_to_float8_training(m)
    x = torch.randn(64, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    m(x).sum().backward()
    return type(m[0]).__name__
check("torchao float8", tao)
def fpx():
    import torchao.quantization as q
    names = [n for n in dir(q) if "fpx" in n.lower() or "FPX" in n or "fp6" in n.lower()]
    return names
check("torchao fpx names", fpx)
def fpx_run():
    from torchao.quantization import quantize_
    try:
        from torchao.quantization import FPXWeightOnlyConfig as C
        cfg = C(3, 2)
    except ImportError:
        from torchao.quantization import fpx_weight_only
        cfg = fpx_weight_only(3, 2)
    m = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False)).to(dev, torch.float16)
    quantize_(m, cfg)
    x = torch.randn(64, 4096, device=dev, dtype=torch.float16, requires_grad=True)
    y = m(x); y.sum().backward()
    return (type(m[0].weight).__name__, x.grad.shape)
check("torchao fpx run+grad", fpx_run)
def bnb():
    import bitsandbytes as bnb
    l = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to(dev)
    x = torch.randn(64, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    l(x).sum().backward()
    return x.grad.shape
check("bnb nf4", bnb)
def nvml():
    import pynvml as n
    n.nvmlInit(); h = n.nvmlDeviceGetHandleByIndex(0)
    return (n.nvmlDeviceGetName(h), n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM), n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_SM), n.nvmlDeviceGetTemperature(h, 0), n.nvmlDeviceGetPowerUsage(h), n.nvmlDeviceGetCurrentClocksThrottleReasons(h) if hasattr(n, "nvmlDeviceGetCurrentClocksThrottleReasons") else n.nvmlDeviceGetCurrentClocksEventReasons(h))
check("nvml", nvml)
def triton_fp8():
    import triton, triton.language as tl
    @triton.jit
    def k(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
        b = tl.load(b_ptr + r[:, None] * BLOCK + r[None, :])
        tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))
    A = torch.randn(64, 64, device=dev).to(torch.float8_e4m3fn); B = torch.randn(64, 64, device=dev).to(torch.float8_e4m3fn)
    C = torch.empty(64, 64, device=dev)
    k[(1,)](A, B, C, BLOCK=64)
    ref = A.float() @ B.float()
    return float((C - ref).abs().max())
check("triton fp8 dot", triton_fp8)
def graph_peft():
    from peft import LoraConfig, get_peft_model
    m = torch.nn.Sequential(); m.add_module("proj", torch.nn.Linear(4096, 4096, bias=False)); m = m.to(dev, torch.bfloat16)
    m = get_peft_model(m, LoraConfig(r=64, target_modules=["proj"]))
    x = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16, requires_grad=True); dy = torch.randn_like(x)
    ps = [p for p in m.parameters() if p.requires_grad]
    def step():
        out = m(x); g = torch.autograd.grad(out, [x, *ps], grad_outputs=dy)
        with torch.no_grad(): torch._foreach_add_(ps, list(g[1:]), alpha=-1e-3)
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): step()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(20):
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize(); ts.append(e0.elapsed_time(e1))
    ts.sort(); return f"median {ts[10]:.3f} ms"
check("cudagraph peft step 4096^3 r64", graph_peft)
