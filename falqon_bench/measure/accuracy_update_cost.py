"""The proxy update alone, default falqon against a variant: the one part of a FALQON layer step a variant changes.

A layer step of default falqon and of a variant (rounding, keep_unmerged, a_scale options) differ only in the
proxy update after the optimizer step (a_scale changes A's values, not the work). Two step times measured one
after the other differ by a few percent from clocks and heat alone, so besides the runner's side-by-side step
times this times the update itself, back to back: (variant - default) / default step time is the variant's cost.

    python -m falqon_bench.measure.accuracy_update_cost --layers llama-7b.attn,llama-7b.up --ranks 16,64 \
        --variant '{"rounding": "stochastic", "keep_unmerged": true}' [--device cuda] [--budget-ms 300]

Times are us per update: CUDA-graph replay on a GPU (B refilled from a saved copy inside each replay, the same
N x r copy for both), wall time on a CPU. Prints one line per (layer, rank).
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

import typer

app = typer.Typer(add_completion=False)


def time_proxy_update_us(K: int, N: int, rank: int, options: dict[str, Any], device: str, budget_ms: float) -> float:
    """Median time of one proxy update (plus the N x r refill of B), us, of a K -> N FalqonLinear with `options`."""
    import torch

    from falqon_core.methods.falqon import FalqonLinear, parse_options

    from falqon_bench.measure.timing import time_cudagraph, time_wall

    torch.manual_seed(0)
    linear = torch.nn.Linear(K, N, bias=False, device=device, dtype=torch.bfloat16)
    layer = FalqonLinear(linear, rank, **parse_options(options))
    b0 = torch.randn(N, rank, device=device) * 1e-3

    def step() -> None:
        layer.lora_B.data.copy_(b0)
        layer.proxy_update()

    if torch.device(device).type == "cuda":
        samples = time_cudagraph(step, device=device, warmup_ms=50.0, budget_ms=budget_ms, min_samples=20)
    else:
        samples = time_wall(step, device=device, warmup_ms=5.0, budget_ms=budget_ms, min_samples=5)
    return statistics.median(samples) * 1e3


def _layer_shapes(name: str) -> list:
    """A named layer ('llama-7b.attn', 'llama-7b') or K x N written '64x128'."""
    from falqon_bench.suites.layers import custom_layer, resolve_layer

    k, sep, n = name.partition("x")
    if sep and k.isdigit() and n.isdigit():
        return [custom_layer(int(k), int(n))]
    return resolve_layer(name)


def _check_device(device: str) -> None:
    """ValueError unless `device` is cpu, or cuda on a machine with a CUDA GPU (torch's own errors are tracebacks)."""
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU here; --device cpu times the update on the CPU")


@app.command()
def main(
    layers: str = typer.Option("llama-7b.attn,llama-7b.up,llama-7b.down", help="Layer names or KxN, comma-separated."),
    ranks: str = typer.Option("16,64", help="Ranks, comma-separated."),
    variant: str = typer.Option(..., help='The variant\'s falqon options as JSON: {"rounding": "stochastic"}.'),
    device: str = typer.Option("cuda", help="cuda or cpu."),
    budget_ms: float = typer.Option(300.0, help="Sampling time per timing, ms."),
) -> None:
    """Print default vs variant proxy-update time per (layer, rank), us."""
    try:
        try:
            options = json.loads(variant)
        except json.JSONDecodeError as e:
            raise ValueError(f"--variant is not JSON ({e}): {variant!r}") from None
        shapes = [s for name in layers.split(",") for s in _layer_shapes(name.strip())]
        rank_list = [int(r) for r in ranks.split(",")]
        if not isinstance(options, dict):
            raise ValueError("--variant must be a JSON object of falqon options")
        if not budget_ms > 0:
            raise ValueError(f"--budget-ms must be > 0, got {budget_ms}")
        _check_device(device)
        from falqon_core.methods.falqon import check_layer_fit, parse_options

        kwargs = parse_options(options)  # an unknown option or value fails here, before any timing
        for shape in shapes:  # and every (layer, rank) the layer itself would refuse
            for rank in rank_list:
                try:
                    check_layer_fit(shape.K, shape.N, rank, kwargs)
                except ValueError as e:
                    raise ValueError(f"{shape.name} ({shape.K} x {shape.N}) at rank {rank}: {e}") from None
    except KeyError as e:
        typer.echo(f"bad input: {e.args[0] if e.args else e}", err=True)
        raise typer.Exit(2) from None
    except ValueError as e:
        typer.echo(f"bad input: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{'layer':<16} {'rank':>4} {'default us':>11} {'variant us':>11} {'diff us':>8}   (proxy update alone, median)")
    for shape in shapes:
        for rank in rank_list:
            default = time_proxy_update_us(shape.K, shape.N, rank, {}, device, budget_ms)
            var = time_proxy_update_us(shape.K, shape.N, rank, options, device, budget_ms)
            typer.echo(f"{shape.name:<16} {rank:>4} {default:>11.2f} {var:>11.2f} {var - default:>8.2f}")


if __name__ == "__main__":
    sys.exit(app())
