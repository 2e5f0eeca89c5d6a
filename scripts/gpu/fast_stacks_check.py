"""Liger-kernel and Unsloth on a GPU: does liger keep each method's loss, and what does it do to the step time?

    python scripts/gpu/fast_stacks_check.py --out DIR [--cpu-smoke]        # driven by scripts/gpu/fast_stacks.sh

For bf16_lora and falqon, with and without liger-kernel (one process: the patches are per model instance, so
the unpatched runs after a patched one also check that nothing leaked), on llama-7b's shapes with 2 layers:
build (seed 0), patch, convert, perturb the adapters (seed 1, so every adapter has a gradient), then
- step 0: loss and the norm of every adapter gradient; liger's are compared with the unpatched run's against
  the bf16 bound of tests/test_fast_stacks.py ((4 L + 2) u |loss|, twice that for gradient norms);
- steps 1..: fwd + bwd + AdamW + after_optimizer_step, CUDA-synchronized wall time per step (ms), median after
  warm-up, tokens/s and peak memory.
The Unsloth baselines (unsloth_lora, unsloth_qlora) run the same timing loop, each in its own subprocess
(importing Unsloth patches transformers and PEFT process-wide). Every variant appends one JSON line to
DIR/points.jsonl as it finishes; a failing variant records its error and the rest go on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from falqon_bench.measure import fast_stacks
from falqon_bench.suites.models import llama_config, make_model
from falqon_core.convert import LLAMA_TARGET_MODULES, convert_model
from falqon_core.methods import AdapterConfig

BF16_UNIT = 2.0**-8
METHODS = ("bf16_lora", "falqon")


def settings(cpu_smoke: bool) -> dict:
    if cpu_smoke:
        return {"model": "tiny-llama", "layers": 2, "batch": 2, "seq": 32, "steps": 3, "warmup": 1, "device": "cpu"}
    return {"model": "llama-7b", "layers": 2, "batch": 2, "seq": 2048, "steps": 13, "warmup": 3, "device": "cuda"}


def append_row(out: Path, row: dict) -> None:
    with (out / "points.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
    print(json.dumps({k: v for k, v in row.items() if k not in ("grad_norms", "step_ms")}), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, params, after_step, tokens_fn, cfg, device) -> dict:
    """Median CUDA-synchronized ms of fwd + bwd + AdamW + after_step over the steps after warm-up."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = []
    for step in range(cfg["steps"]):
        tokens = tokens_fn(step)
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after_step()
        sync(device)
        if step >= cfg["warmup"]:
            samples.append((time.perf_counter() - t0) * 1e3)
    wall_ms = statistics.median(samples)
    return {
        "wall_ms": wall_ms,
        "step_ms": samples,
        "tokens_per_s": cfg["batch"] * cfg["seq"] / (wall_ms / 1e3),
        "peak_mem_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "loss_last": float(loss.detach()),
    }


def tokens_for(cfg, vocab: int, device):
    def tokens_fn(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + step)
        return torch.randint(0, vocab, (cfg["batch"], cfg["seq"]), generator=g).to(device)

    return tokens_fn


def run_method(method: str, liger: bool, cfg: dict) -> dict:
    device = torch.device(cfg["device"])
    row = {"variant": f"{method}{'+liger' if liger else ''}", "method": method, "liger": liger, "status": "ok",
           "error": None, "model": cfg["model"], "layers": cfg["layers"], "tokens": cfg["batch"] * cfg["seq"]}
    if liger and (reason := fast_stacks.liger_unavailable_reason(device)):
        return {**row, "status": "unsupported", "error": reason}
    model = make_model(cfg["model"], device, torch.bfloat16, num_layers=cfg["layers"], seed=0)
    if liger:
        fast_stacks.apply_liger(model)
    converted, method_obj = convert_model(model, method, AdapterConfig(rank=16, target_modules=LLAMA_TARGET_MODULES))
    params = method_obj.trainable_parameters(converted)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(1)
        with torch.no_grad():
            for p in params:
                p.add_(0.02 * torch.randn_like(p))
    tokens_fn = tokens_for(cfg, int(model.config.vocab_size), device)
    first = tokens_fn(0)
    loss = converted(input_ids=first, labels=first).loss
    loss.backward()
    row["loss_step0"] = float(loss.detach())
    row["grad_norms"] = [float(torch.linalg.vector_norm(p.grad.float())) for p in params]
    for p in params:
        p.grad = None
    row.update(time_steps(converted, params, lambda: method_obj.after_optimizer_step(converted), tokens_fn, cfg, device))
    return row


def run_unsloth(baseline: str, cfg: dict, workdir: Path) -> dict:
    device = torch.device(cfg["device"])
    row = {"variant": baseline, "method": baseline, "liger": False, "status": "ok", "error": None,
           "model": cfg["model"], "layers": cfg["layers"], "tokens": cfg["batch"] * cfg["seq"]}
    if reason := fast_stacks.unsloth_unavailable_reason(device):
        return {**row, "status": "unsupported", "error": reason}
    import importlib.metadata

    row["unsloth_version"] = importlib.metadata.version("unsloth")
    vocab = int(llama_config(cfg["model"], cfg["layers"]).vocab_size)
    # passed without a name kept here, so the random-init copy is freed once it is saved for Unsloth
    unsloth_model, params = fast_stacks.build_unsloth_model(
        baseline, make_model(cfg["model"], device, torch.bfloat16, num_layers=cfg["layers"], seed=0), 16, cfg["seq"],
        workdir,
    )
    unsloth_model.train()
    row.update(time_steps(unsloth_model, params, lambda: None, tokens_for(cfg, vocab, device), cfg, device))
    return row


def guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as exc:  # one failing variant must not stop the others
        traceback.print_exc()
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}


def compare_with_unpatched(rows: dict[str, dict], layers: int) -> None:
    """Add liger's loss and gradient-norm differences to each +liger row, and whether they are within bf16."""
    roundings = 4 * layers + 2
    for method in METHODS:
        plain, fused = rows.get(method), rows.get(f"{method}+liger")
        if not plain or not fused or plain["status"] != "ok" or fused["status"] != "ok":
            continue
        loss_diff = abs(fused["loss_step0"] - plain["loss_step0"])
        grad_diffs = [abs(a - b) / max(b, 1e-30) for a, b in zip(fused["grad_norms"], plain["grad_norms"])]
        fused["loss_diff"] = loss_diff
        fused["loss_bound"] = roundings * BF16_UNIT * abs(plain["loss_step0"])
        fused["grad_norm_rel_diff_max"] = max(grad_diffs) if grad_diffs else None
        fused["matches_unpatched"] = bool(
            loss_diff <= fused["loss_bound"] and grad_diffs and max(grad_diffs) <= 2 * roundings * BF16_UNIT
        )
        fused["speedup_vs_unpatched"] = plain["wall_ms"] / fused["wall_ms"]


def print_summary(rows: list[dict]) -> None:
    print("\nvariant              status       step ms  tokens/s   peak GiB  loss0     matches  speedup")
    for r in rows:
        mem = f"{r['peak_mem_bytes'] / 2**30:8.2f}" if r.get("peak_mem_bytes") else "       -"
        print(
            f"{r.get('variant', '?'):20s} {r['status']:11s} "
            f"{r.get('wall_ms') or float('nan'):8.1f} {r.get('tokens_per_s') or float('nan'):9.0f} {mem}  "
            f"{r.get('loss_step0') or float('nan'):8.4f}  {str(r.get('matches_unpatched', '-')):7s}  "
            f"{r.get('speedup_vs_unpatched') or float('nan'):.3f}"
        )
        if r.get("error"):
            print(f"    {r['error']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny-llama on CPU, 3 steps: checks the plumbing")
    parser.add_argument("--unsloth", choices=sorted(fast_stacks.UNSLOTH_BASELINES),
                        help="(internal) run one Unsloth baseline in this process and append its row")
    parser.add_argument("--unsloth-timeout-s", type=int, default=90)
    args = parser.parse_args()
    cfg = settings(args.cpu_smoke)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.unsloth:
        with tempfile.TemporaryDirectory() as workdir:
            row = {"variant": args.unsloth, "method": args.unsloth, **guarded(run_unsloth, args.unsloth, cfg, Path(workdir))}
        append_row(args.out, row)
        return 0

    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cfg["device"] == "cuda" else "cpu",
           **{name: fast_stacks._installed_version(name) for name in ("transformers", "peft", "liger-kernel", "unsloth")}}
    (args.out / "env.json").write_text(json.dumps({**env, "settings": cfg}, indent=2))
    print(json.dumps(env), flush=True)
    rows: dict[str, dict] = {}
    # plain first, then liger, then plain again: the second plain run shows the patches did not leak
    for method, liger, key in [(m, False, m) for m in METHODS] + [(m, True, f"{m}+liger") for m in METHODS] + [
        (METHODS[0], False, f"{METHODS[0]}(after liger)")
    ]:
        row = {"variant": key, "method": method, "liger": liger, **guarded(run_method, method, liger, cfg)}
        row["variant"] = key
        rows[key] = row
        if cfg["device"] == "cuda":
            torch.cuda.empty_cache()
    compare_with_unpatched(rows, cfg["layers"])
    after, before = rows.get(f"{METHODS[0]}(after liger)"), rows.get(METHODS[0])
    if after and before and after["status"] == before["status"] == "ok":
        after["same_loss_as_first_plain_run"] = after["loss_step0"] == before["loss_step0"]
    for row in rows.values():
        append_row(args.out, row)

    for baseline in fast_stacks.UNSLOTH_BASELINES:
        command = [sys.executable, __file__, "--out", str(args.out), "--unsloth", baseline]
        if args.cpu_smoke:
            command.append("--cpu-smoke")
        try:
            done = subprocess.run(command, timeout=args.unsloth_timeout_s)
            failed = done.returncode != 0
        except subprocess.TimeoutExpired:
            failed = True
        if failed:
            append_row(args.out, {"variant": baseline, "method": baseline, "status": "error",
                                  "error": f"subprocess failed or ran past {args.unsloth_timeout_s} s"})

    all_rows = [json.loads(line) for line in (args.out / "points.jsonl").read_text().splitlines()]
    print_summary(all_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
