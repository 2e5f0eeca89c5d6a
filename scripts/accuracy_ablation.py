"""Ablations behind docs/accuracy.md, "Why the variant trails bf16_lora on text (CPU study)": the accuracy suite's
corpora, pretrained base (cached under /tmp/acc-ablation/base), fixed held-out batches and AdamW loop, with setups the
suite cannot express patched into the layers. Exploratory, CPU, one seed; results appended to
/tmp/acc-ablation/results.jsonl and printed.

    PYTHONPATH=. python scripts/accuracy_ablation.py TASK 'SETUP@LR[,LR...]' ...

TASK: syn (the accuracy-synthetic suite), txt / txt4 (tiny-llama on stdlib bytes, rank 16 / 4), sml (small-llama).
SETUP: METHOD|OPTIONS_JSON|HACKS, e.g. 'bf16_lora@1e-2', 'bf16_lora||fa@1e-2' (LoRA A frozen),
'falqon|{"a_scale":"kaiming"}|exact@2e-2' (fp32 master W, all of B merged exactly every step, forward on
round-to-nearest(master)), 'falqon|{"a_scale":"kaiming","rounding":"stochastic","keep_unmerged":true,"flush_every":4}@2e-2'.
"""
import json, sys, time
import torch
from falqon_bench.measure.corpora import make_corpus
from falqon_bench.measure.accuracy_run import pretrained_base, evaluate, lm_loss
from falqon_bench.suites.models import make_model
from falqon_core.convert import LLAMA_TARGET_MODULES, convert_model
from falqon_core.methods import AdapterConfig
from falqon_core.methods.falqon import falqon_layers
from falqon_core import fp8

TASKS = {
    "syn": dict(model="tiny-llama", corpus="synthetic", seq_len=32, batch=8, pretrain_steps=150, pretrain_lr=3e-3, steps=100, eval_batches=4),
    "txt4": dict(model="tiny-llama", corpus="stdlib", seq_len=64, batch=8, pretrain_steps=300, pretrain_lr=3e-3, steps=150, eval_batches=4, rank=4, base="txt"),
    "syn4": dict(model="tiny-llama", corpus="synthetic", seq_len=32, batch=8, pretrain_steps=150, pretrain_lr=3e-3, steps=100, eval_batches=4, rank=4, base="syn"),
    "sml": dict(model="small-llama", corpus="stdlib", seq_len=64, batch=8, pretrain_steps=300, pretrain_lr=3e-3, steps=150, eval_batches=4),
    "txt": dict(model="tiny-llama", corpus="stdlib", seq_len=64, batch=8, pretrain_steps=300, pretrain_lr=3e-3, steps=150, eval_batches=4),
}

def setup_exact(layer):
    """fp32 master of W (fp8 units): every update merges all of B exactly; W8 = RTN(master)."""
    layer._master = layer.backbone_fp8.float().clone()
    def upd():
        layer._master += layer.lora_B.float() @ layer.adapter_fp8.float()
        layer.backbone_fp8.view(torch.uint8).copy_(fp8.saturating_cast(layer._master, layer.melded.dtype).view(torch.uint8))
        layer.lora_B.zero_()
        layer.updates_done += 1; layer.last_k = layer.out_features
    layer.proxy_update = upd

def _results_file():
    from pathlib import Path
    Path("/tmp/acc-ablation").mkdir(parents=True, exist_ok=True)
    return open("/tmp/acc-ablation/results.jsonl", "a")


def run(task, label, lr, seed=0, base_dir="/tmp/acc-ablation/base"):
    t = TASKS[task]
    spec = label.split("|")
    method = spec[0]
    opts = json.loads(spec[1]) if len(spec) > 1 and spec[1] else {}
    hacks = spec[2].split(",") if len(spec) > 2 else []
    dev = torch.device("cpu")
    corpus = make_corpus(t["corpus"], seed, None, t["model"])
    point = {"options": {"corpus": t["corpus"], "layers": None, "seed": seed, "pretrain_steps": t["pretrain_steps"], "batch": t["batch"], "seq_len": t["seq_len"]},
             "layer": t["model"], "model": t["model"], "pretrain_lr": t["pretrain_lr"], "allow_pickle": False}
    state = pretrained_base(point, corpus, dev, f"{base_dir}/{t.get('base', task)}")
    model = make_model(t["model"], dev, torch.bfloat16, seed=seed)
    model.load_state_dict(state)
    for p in model.parameters(): p.requires_grad_(False)
    torch.manual_seed(seed)
    model, m = convert_model(model, method, AdapterConfig(rank=t.get("rank", 16), target_modules=LLAMA_TARGET_MODULES, options=opts, seed=seed))
    params = m.trainable_parameters(model)
    if "fa" in hacks:  # freeze LoRA A
        params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
        for n, p in model.named_parameters():
            if "lora_A" in n: p.requires_grad_(False)
    layers = [l for _, l in falqon_layers(model)]
    for l in layers:
        if "exact" in hacks: setup_exact(l)
    if layers and hacks:
        for l in layers: l.proxy_group = None
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    held = corpus.heldout_batches(t["eval_batches"], t["batch"], t["seq_len"])
    g = torch.Generator().manual_seed(20_000 + seed)
    l0, _ = evaluate(model, held, dev)
    t0 = time.time()
    for step in range(t["steps"]):
        tok = corpus.sample("finetune", g, t["batch"], t["seq_len"])
        loss = lm_loss(model, tok); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        if "exact" in hacks:
            with torch.no_grad():
                for l in layers: l.proxy_update()
        else:
            m.after_optimizer_step(model)
    lf, af = evaluate(model, held, dev)
    res = dict(task=task, label=label, lr=lr, seed=seed, start=l0, final=lf, acc=af, sec=round(time.time() - t0, 1))
    print(json.dumps(res), flush=True)
    with _results_file() as f: f.write(json.dumps(res) + "\n")
    return lf

if __name__ == "__main__":
    task = sys.argv[1]
    for arg in sys.argv[2:]:
        label, lrs = arg.rsplit("@", 1)
        for lr in lrs.split(","):
            run(task, label, float(lr))
