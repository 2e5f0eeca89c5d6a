"""Where does qlora_nf4 on Qwen2.5-7B (config only, 4 layers) go non-finite in the e2e runner's build?"""
import torch
from falqon_bench.measure import timing, e2e_step
from falqon_bench.measure.e2e_step import build_training, make_batches
dev = torch.device("cuda")

def first_bad(model, batch):
    bad = []
    hooks = []
    for name, mod in model.named_modules():
        def hook(m, inp, out, name=name):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if hasattr(t, "logits"): t = t.logits
            if torch.is_tensor(t) and t.is_floating_point() and not bad:
                if not torch.isfinite(t).all():
                    ti = [x for x in (inp if isinstance(inp, tuple) else (inp,)) if torch.is_tensor(x)]
                    fin_in = [bool(torch.isfinite(x).all()) if x.is_floating_point() else None for x in ti]
                    bad.append((name, type(m).__name__, fin_in, float(t.float().abs().nan_to_num(0, 0, 0).max())))
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=batch, labels=batch)
    for h in hooks: h.remove()
    return bad

def run(layers, maskless=True, method="qlora_nf4", spec="suites/models/qwen2.5-7b", steps=3):
    point = {"method": method, "model": spec, "rank": 16, "allow_pickle": False,
             "options": {"mode": "eager", "seq_len": 2048, "batch": 2, "layers": layers, "lr": 1e-4, "seed": 0, "steps": steps,
                         "warmup_steps": 1, "liger": False, "world_size": 1, "method_options": {}}}
    orig = e2e_step.use_maskless_causal_sdpa
    if not maskless:
        e2e_step.use_maskless_causal_sdpa = lambda m: None
    try:
        with timing.point_stream(dev):
            tr, _, _ = build_training(point, dev)
            batches = make_batches(point, int(tr.base.config.vocab_size), dev)
            nonfinite_w = [n for n, p in tr.base.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
            bad = first_bad(tr.base, batches[0])
            losses = [tr.step(b).item() for b in batches]
        print(f"{method} layers={layers} maskless={maskless} losses={losses} nonfinite_params={nonfinite_w[:3]} first_bad={bad}", flush=True)
    finally:
        e2e_step.use_maskless_causal_sdpa = orig
    del tr; torch.cuda.empty_cache()

for layers in (4, 3, 2):
    run(layers)
run(4, maskless=False)
run(4, method="bf16_lora")
