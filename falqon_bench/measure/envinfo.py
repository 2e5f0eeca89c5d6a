"""Where a run ran: GPU, driver, clocks, power, temperature, throttle reasons (nvidia-ml-py), library versions, git sha.

Every function tolerates a machine without an NVIDIA GPU or without NVML: it returns what is known and
says "no NVIDIA GPU" instead of raising. Clocks in MHz, power in W, temperature in deg C, memory in bytes.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import socket
import subprocess
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch

NO_GPU = "no NVIDIA GPU"
CLOCK_DROP_FRACTION = 0.9  # a point whose SM clock fell below 90% of max is flagged
PACKAGES = ("torch", "triton", "peft", "transformers", "torchao", "bitsandbytes", "nvidia-ml-py", "falqon-bench",
            "liger-kernel", "unsloth", "unsloth_zoo")  # the last three: the fast stacks (falqon_bench.measure.fast_stacks)


def package_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide the numbers; 'missing' when absent."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    out["torch.version.cuda"] = str(torch.version.cuda)
    return out


GIT_SHA_ENV = "FALQON_GIT_SHA"


def git_info(repo: Path | None = None) -> dict[str, Any]:
    """{'sha': commit or None, 'dirty': bool or None} of the repo holding this package (None without git).

    $FALQON_GIT_SHA, when set, is the sha (dirty unknown): a copy of a working tree on a remote GPU machine
    can carry a stale .git, so whoever sends the tree states the commit it holds.
    """
    if os.environ.get(GIT_SHA_ENV):
        return {"sha": os.environ[GIT_SHA_ENV].strip(), "dirty": None, "source": GIT_SHA_ENV}
    repo = repo or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device | str) -> str:
    """The GPU name as the driver reports it, or 'CPU' (the `device` key of every point)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


# ---------------------------------------------------------------- NVML


@lru_cache(maxsize=1)
def _nvml() -> tuple[Any, str | None]:
    """(pynvml module or None, why not). Initialized once per process."""
    try:
        import pynvml
    except ImportError as e:
        return None, f"nvidia-ml-py is not installed ({e})"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"{NO_GPU} (NVML unavailable: {e})"
    return pynvml, None


def _nvml_handle(device: torch.device | str | None) -> tuple[Any, Any, str | None]:
    """(pynvml, handle, why-not) for a torch CUDA device, matched by UUID (CUDA_VISIBLE_DEVICES-proof)."""
    nv, why = _nvml()
    if nv is None:
        return None, None, why
    index = 0
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda":
            return None, None, "CPU run"
        index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        if torch.cuda.is_available():
            uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
            for candidate in (uuid, f"GPU-{uuid}"):
                try:
                    return nv, nv.nvmlDeviceGetHandleByUUID(candidate), None
                except Exception:
                    continue
        if nv.nvmlDeviceGetCount() == 0:
            return None, None, NO_GPU
        return nv, nv.nvmlDeviceGetHandleByIndex(index), None
    except Exception as e:
        return None, None, f"{NO_GPU} (NVML: {e})"


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@lru_cache(maxsize=1)
def _reason_bits() -> dict[int, str]:
    """Throttle/clock-event bit -> snake_case name, from the constants pynvml defines (no NVML init needed)."""
    try:
        import pynvml
    except ImportError:
        return {}
    bits: dict[int, str] = {}
    for prefix in ("nvmlClocksEventReason", "nvmlClocksThrottleReason"):
        for attr in dir(pynvml):
            if attr.startswith(prefix):
                short, value = attr[len(prefix):], getattr(pynvml, attr)
                if short not in ("All", "None", "Unknown") and isinstance(value, int) and value:
                    bits.setdefault(value, _snake(short))
    return bits


def decode_throttle_reasons(mask: int) -> list[str]:
    """NVML's throttle-reason bitmask as names, e.g. 0x4 -> ['sw_power_cap']; unknown bits as hex."""
    names, rest = [], int(mask)
    for bit, name in sorted(_reason_bits().items()):
        if mask & bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(hex(rest))
    return names


def gpu_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """Clocks (MHz), temperature (C), power (W), throttle reasons and memory of the GPU now; {'note': ...} without one."""
    nv, h, why = _nvml_handle(device)
    if h is None:
        return {"note": why or NO_GPU}
    state: dict[str, Any] = {}
    reads = {
        "sm_clock_mhz": lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
        "max_sm_clock_mhz": lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM),
        "mem_clock_mhz": lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
        "temperature_c": lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
        "power_w": lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
        "memory_used_bytes": lambda: nv.nvmlDeviceGetMemoryInfo(h).used,
    }
    for key, read in reads.items():
        try:
            state[key] = read()
        except Exception:
            state[key] = None
    getter = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or nv.nvmlDeviceGetCurrentClocksThrottleReasons
    try:
        state["throttle_reasons"] = decode_throttle_reasons(getter(h))
    except Exception:
        state["throttle_reasons"] = None
    return state


def clock_dropped(before: dict[str, Any], after: dict[str, Any]) -> bool | None:
    """True when either reading shows the SM clock below 90% of max while the GPU was busy (not idle).

    An idle GPU parks its clock low by design, so a reading whose reasons include 'gpu_idle' does not
    count. None when there is no clock reading (CPU, no NVML).
    """
    verdicts = []
    for s in (before, after):
        sm, mx = s.get("sm_clock_mhz"), s.get("max_sm_clock_mhz")
        if not sm or not mx:
            continue
        if "gpu_idle" in (s.get("throttle_reasons") or []):
            verdicts.append(False)
            continue
        verdicts.append(sm < CLOCK_DROP_FRACTION * mx)
    return any(verdicts) if verdicts else None


def gpu_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Static facts of the GPU: name, driver, CUDA driver version, memory, max clocks, power limit; {'note'} without one."""
    nv, h, why = _nvml_handle(device)
    if h is None:
        return {"note": why or NO_GPU}
    info: dict[str, Any] = {}
    reads = {
        "name": lambda: nv.nvmlDeviceGetName(h),
        "driver": lambda: nv.nvmlSystemGetDriverVersion(),
        "cuda_driver_version": lambda: _cuda_version_text(nv.nvmlSystemGetCudaDriverVersion()),
        "memory_total_bytes": lambda: nv.nvmlDeviceGetMemoryInfo(h).total,
        "max_sm_clock_mhz": lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM),
        "max_mem_clock_mhz": lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM),
        "power_limit_w": lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
        "uuid": lambda: nv.nvmlDeviceGetUUID(h),
    }
    for key, read in reads.items():
        try:
            value = read()
            info[key] = value.decode() if isinstance(value, bytes) else value
        except Exception:
            info[key] = None
    return info


def _cuda_version_text(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def kernel_table() -> dict[str, Any]:
    """The quantize kernels' launch-config table the run uses (committed, or $FALQON_KERNEL_TABLE's override).

    A bad override file is an input error (a clear message, exit 2), found here before any point runs."""
    from falqon_bench.data.errors import BenchInputError

    from falqon_core.kernels import quantize_configs

    try:
        return quantize_configs.table_source()
    except ValueError as err:
        raise BenchInputError(f"{err}. Unset FALQON_KERNEL_TABLE or point it at a scripts/gpu/tune_quantize.py "
                              "--out file.") from None


def collect_env(device: torch.device | str | None = None) -> dict[str, Any]:
    """Everything a results manifest records about the machine; never raises for a missing GPU or NVML."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    env: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "versions": package_versions(),
        "git": git_info(),
        "kernel_table": kernel_table(),
    }
    if device.type == "cuda":
        env["gpu"] = gpu_info(device)
        env["gpu_state"] = gpu_state(device)
        props = torch.cuda.get_device_properties(device)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["sm_count"] = props.multi_processor_count
        env["l2_cache_bytes"] = getattr(props, "L2_cache_size", None)
    else:
        env["gpu"] = {"note": NO_GPU if not torch.cuda.is_available() else "CPU run (a GPU is present but unused)"}
    return env


@contextmanager
def locked_clocks(device: torch.device | str) -> Iterator[dict[str, Any]]:
    """Lock the SM clock at the default applications clock for the block, reset after. Only on request (--lock-clocks).

    Needs root (or the driver's permission); when it cannot lock, yields {'locked': False, 'reason': ...}.
    """
    nv, h, why = _nvml_handle(device)
    if h is None:
        yield {"locked": False, "reason": why or NO_GPU}
        return
    try:
        try:
            mhz = nv.nvmlDeviceGetDefaultApplicationsClock(h, nv.NVML_CLOCK_SM)
        except Exception:
            mhz = nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)
        nv.nvmlDeviceSetGpuLockedClocks(h, mhz, mhz)
    except Exception as e:
        yield {"locked": False, "reason": f"nvmlDeviceSetGpuLockedClocks failed: {e} (needs root)"}
        return
    try:
        yield {"locked": True, "sm_clock_mhz": mhz}
    finally:
        try:
            nv.nvmlDeviceResetGpuLockedClocks(h)
        except Exception:
            pass
