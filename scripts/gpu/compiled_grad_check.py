"""Does the compiled step compute the eager step's gradients? (GPU, ~1 min): llama-7b shapes with 2 layers,
2 x 2048 tokens, rank 16; per method, each adapter gradient of the per-layer compiled model (e2e_step.compile_blocks,
inductor) against eager, and the loss. Prints one line per method: loss diff, max relative gradient-norm diff,
and the layers whose gradient is missing or zero (a backward that skipped work would show here).

    python scripts/gpu/compiled_grad_check.py [--methods falqon bf16_lora] [--layers 2] [--options '{"batched_update": false}']
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from falqon_bench.measure.e2e_step import compile_blocks
from falqon_bench.suites.models import make_model
from falqon_core.convert import LLAMA_TARGET_MODULES, convert_model
from falqon_core.methods import AdapterConfig


def grads(model, tokens):
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["falqon", "bf16_lora", "halo_lora"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--model", default="llama-7b")
    parser.add_argument("--options", default="{}", help="method options as JSON, given to every method")
    args = parser.parse_args()
    options = json.loads(args.options)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seq = 2048 if device.type == "cuda" else 32
    base = make_model(args.model, device, torch.bfloat16, num_layers=args.layers, seed=0)
    tokens = torch.randint(0, base.config.vocab_size, (2, seq), device=device, generator=torch.Generator(device).manual_seed(1))
    for method in args.methods:
        results = {}
        for mode in ("eager", "compile"):
            model, _ = convert_model(copy.deepcopy(base), method, AdapterConfig(rank=16, target_modules=LLAMA_TARGET_MODULES, options=options))
            if mode == "compile":
                compile_blocks(model)
            results[mode] = grads(model, tokens)
            del model
        (le, ge), (lc, gc) = results["eager"], results["compile"]
        missing = [n for n in ge if gc.get(n) is None or (ge[n] is not None and ge[n].abs().max() > 0 and gc[n].abs().max() == 0)]
        rel = max(((ge[n].float() - gc[n].float()).norm() / ge[n].float().norm().clamp_min(1e-30)).item()
                  for n in ge if ge[n] is not None and gc.get(n) is not None)
        print(f"{method:10} loss eager {le:.5f} compiled {lc:.5f} | max rel grad diff {rel:.3g} | "
              f"{len(ge)} adapter tensors, missing/zero in compiled: {len(missing)}: {missing[:8] or 'none'}", flush=True)


if __name__ == "__main__":
    main()
