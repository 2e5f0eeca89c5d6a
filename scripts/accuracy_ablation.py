"""Ablations behind docs/accuracy.md, "Why the variant trails bf16_lora on text (CPU study)": the accuracy suite's
corpora, pretrained base (cached under /tmp/acc-ablation/base), fixed held-out batches and AdamW loop, with setups the
suite cannot express patched into the layers. Exploratory, CPU, one seed a run (`fs=N` below); results appended to
/tmp/acc-ablation/results.jsonl and printed.

    PYTHONPATH=. python scripts/accuracy_ablation.py TASK 'SETUP@LR[,LR...]' ...

TASK: syn (the accuracy-synthetic suite), txt / txt4 (tiny-llama on stdlib bytes, rank 16 / 4), sml (small-llama).
SETUP: METHOD|OPTIONS_JSON|HACKS, e.g. 'bf16_lora@1e-2', 'bf16_lora||fa@1e-2' (LoRA A frozen),
'falqon|{"a_scale":"kaiming"}|exact@2e-2' (fp32 master W, all of B merged exactly every step, forward on
round-to-nearest(master)), 'falqon|{"a_scale":"kaiming","rounding":"stochastic","keep_unmerged":true,"flush_every":4}@2e-2'.
Trained A (issue 12; docs/accuracy.md, "Trained A"), falqon hacks (HACKS is a comma-separated list):
  ta        A gets an fp32 master parameter (real units, A8 x s) stepped by the same AdamW, with LoRA's gradient at
            FALQON's current B, dA = (dY8.B)^T x8 (e5m2 dY, e4m3 x, as the layer has them); A8 is re-cast from the
            master at the melded scale after the proxy update
  tacum     the same at LoRA's B: everything merged so far (an fp32 N x r shadow) plus the current B
  tapb      the same at the B of the last update before it merged (an N x r copy)
  tanorm    after each optimizer step every row of A's master is scaled back to its norm at init
  tamerge   (with tacum) before the update, W8 += B_merged . (A8_new - A8_old) with stochastic rounding, then A8 =
            A8_new: W8 = W0 + B_merged . A8 as A moves (LoRA's B.dA term); with `exact`, into W's fp32 master
            (LoRA with an e4m3 forward and dA from fp8 operands)
  tamergef  tamerge only every 4th step (at the flush of flush_every = 4); A8 stays fixed in between
  tapre     A8 re-cast before the update (the merge uses the new A)
  talr=F    A's lr is F x B's (a second param group)
  fs=N      fine-tune seed N: the batches and torch's seed at conversion (LoRA's A init, falqon's randomized SVD);
            the base, the held-out batches and falqon's rounding seed option stay as they are
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

class _TrainAGrad(torch.autograd.Function):
    """Identity on the layer output; its backward adds dA = (dY8 . B)^T x8 for A's master (FALQON's operands)."""

    @staticmethod
    def forward(ctx, out, x2d, a_master, b):
        x8, xs = fp8.quantize(x2d.detach().float(), fp8.E4M3)
        ctx.save_for_backward(x8, xs, b)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        x8, xs, b = ctx.saved_tensors
        dy8, dys = fp8.quantize(grad_out.reshape(-1, grad_out.shape[-1]).float(), fp8.E5M2)
        p = (dy8.float() * dys) @ b  # M x r
        return grad_out, None, p.t() @ (x8.float() * xs), None


def setup_train_a(layer, which_b):
    """`ta` / `tacum` / `tapb` (module docstring): A's fp32 master in real units, fed its LoRA gradient at the
    current B ("now"), the cumulative B ("cum") or the B of the last update before it merged ("pre")."""
    layer.lora_A_master = torch.nn.Parameter(layer.adapter_fp8.float() * layer.scale)
    layer._a_row_norm = layer.lora_A_master.detach().norm(dim=1, keepdim=True)
    layer._b_total = torch.zeros_like(layer.lora_B.detach())
    layer._b_pre = torch.zeros_like(layer.lora_B.detach())
    orig_forward = layer.forward
    def fwd(x):
        out = orig_forward(x)
        b = {"now": layer.lora_B.detach(), "cum": layer.lora_B.detach() + layer._b_total, "pre": layer._b_pre}[which_b]
        return _TrainAGrad.apply(out, x.reshape(-1, layer.in_features), layer.lora_A_master, b)
    layer.forward = fwd
    orig_update = layer.proxy_update
    def upd():
        before = layer.lora_B.detach().clone()
        layer._b_pre.copy_(before)
        rows = orig_update()
        layer._b_total += before - layer.lora_B.detach()  # what the update merged (and zeroed) moves into the shadow
        return rows
    layer.proxy_update = upd


@torch.no_grad()
def merge_a_step(layer, seed):
    """`tamerge`: the LoRA term B.dA that FALQON's W never gets: W8 += B_merged_so_far . (A8_new - A8_old), stochastic
    rounding, then A8 = A8_new. Keeps W8 = W0 + (everything merged) . A8 as A moves."""
    from falqon_core.kernels.proxy_update import rounding_bits_reference, stochastic_round_reference
    a_old = layer.adapter_fp8.float()
    a_new = fp8.saturating_cast(layer.lora_A_master / layer.scale, layer.melded.dtype).float()
    if hasattr(layer, "_master"):  # with `exact`: into the fp32 master of W, W8 = round-to-nearest(master)
        layer._master += layer._b_total @ (a_new - a_old)
        layer.backbone_fp8.view(torch.uint8).copy_(fp8.saturating_cast(layer._master, layer.melded.dtype).view(torch.uint8))
    else:
        w = layer.backbone_fp8.float() + layer._b_total @ (a_new - a_old)
        bits = rounding_bits_reference(torch.tensor(seed + 7919, dtype=torch.int64), torch.arange(w.shape[0]), w.shape[1])
        layer.backbone_fp8.view(torch.uint8).copy_(stochastic_round_reference(w, bits).to(layer.melded.dtype).view(torch.uint8))
    layer.adapter_fp8.view(torch.uint8).copy_(a_new.to(layer.melded.dtype).view(torch.uint8))


@torch.no_grad()
def recast_a(layer):
    layer.adapter_fp8.view(torch.uint8).copy_(
        fp8.saturating_cast(layer.lora_A_master / layer.scale, layer.melded.dtype).view(torch.uint8))


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
    fseed = ([int(h.split("=")[1]) for h in hacks if h.startswith("fs=")] or [seed])[0]  # fine-tune seed (base: seed)
    torch.manual_seed(fseed)
    model, m = convert_model(model, method, AdapterConfig(rank=t.get("rank", 16), target_modules=LLAMA_TARGET_MODULES, options=opts, seed=fseed))
    params = m.trainable_parameters(model)
    if "fa" in hacks:  # freeze LoRA A
        params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
        for n, p in model.named_parameters():
            if "lora_A" in n: p.requires_grad_(False)
    layers = [l for _, l in falqon_layers(model)]
    train_a = "ta" in hacks or "tacum" in hacks or "tapb" in hacks
    for l in layers:
        if "exact" in hacks: setup_exact(l)
        if train_a: setup_train_a(l, "cum" if "tacum" in hacks else "pre" if "tapb" in hacks else "now")
    if train_a:
        a_params = [l.lora_A_master for l in layers]
        a_lr = [float(h.split("=")[1]) for h in hacks if h.startswith("talr=")]
        if a_lr:
            params = [{"params": params}, {"params": a_params, "lr": lr * a_lr[0]}]
        else:
            params = params + a_params
    if layers and [h for h in hacks if not h.startswith("fs=")]:
        for l in layers: l.proxy_group = None
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    held = corpus.heldout_batches(t["eval_batches"], t["batch"], t["seq_len"])
    g = torch.Generator().manual_seed(20_000 + fseed)
    l0, _ = evaluate(model, held, dev)
    t0 = time.time()
    for step in range(t["steps"]):
        tok = corpus.sample("finetune", g, t["batch"], t["seq_len"])
        loss = lm_loss(model, tok); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        if "tanorm" in hacks:  # rows of A back to their init norms: A rotates, W's step size stays a_scale's
            with torch.no_grad():
                for l in layers: l.lora_A_master.mul_(l._a_row_norm / l.lora_A_master.norm(dim=1, keepdim=True).clamp_min(1e-30))
        if "tamerge" in hacks or ("tamergef" in hacks and (step + 1) % 4 == 0):  # before the update: it merges with A8_new
            for l in layers: merge_a_step(l, step)
        elif train_a and "tapre" in hacks:
            for l in layers: recast_a(l)
        if "exact" in hacks:
            with torch.no_grad():
                for l in layers: l.proxy_update()
        elif train_a:
            with torch.no_grad():
                for l in layers: l.proxy_update()  # the patched update (Falqon.after_optimizer_step skips nothing here)
        else:
            m.after_optimizer_step(model)
        if train_a and not {"tapre", "tamerge", "tamergef"} & set(hacks):
            for l in layers: recast_a(l)
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
