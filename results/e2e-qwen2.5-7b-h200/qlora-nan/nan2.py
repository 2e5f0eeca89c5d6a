import torch
from falqon_bench.suites.models import make_model
from falqon_core.convert import convert_model, projection_targets
from falqon_core.methods import AdapterConfig
dev = torch.device("cuda")
for layers, bias_off in [(4, False), (4, True)]:
    m = make_model("suites/models/qwen2.5-7b", dev, torch.bfloat16, num_layers=layers, seed=0)
    if bias_off:
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias = None
    for p in m.parameters(): p.requires_grad_(False)
    m, meth = convert_model(m, "qlora_nf4", AdapterConfig(rank=16, target_modules=projection_targets(m), seed=0))
    params = list(meth.trainable_parameters(m))
    opt = torch.optim.AdamW(params, lr=1e-4)
    tok = torch.randint(0, 152064, (2, 2048), device=dev)
    for step in range(3):
        out = m(input_ids=tok, labels=tok)
        out.loss.backward()
        gbad = [n for n, p in m.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        print("layers", layers, "bias removed", bias_off, "step", step, "loss", out.loss.item(), "non-finite grads", len(gbad), gbad[:2], flush=True)
        opt.step(); opt.zero_grad()
    del m, opt; torch.cuda.empty_cache()
