import torch
from falqon_bench.measure import timing
from falqon_bench.measure.e2e_step import build_training, make_batches
dev = torch.device("cuda")
for spec in ["suites/models/qwen2.5-7b", "llama-7b"]:
    for stream in (False, True):
        point = {"method": "qlora_nf4", "model": spec, "rank": 16, "allow_pickle": False,
                 "options": {"mode": "eager", "seq_len": 2048, "batch": 2, "layers": 2, "lr": 1e-4, "seed": 0, "steps": 3,
                             "warmup_steps": 1, "liger": False, "world_size": 1, "method_options": {}}}
        ctx = timing.point_stream(dev) if stream else torch.cuda.stream(torch.cuda.current_stream())
        with ctx:
            tr, _, _ = build_training(point, dev)
            batches = make_batches(point, int(tr.base.config.vocab_size), dev)
            losses = [tr.step(b).item() for b in batches]
        print(spec, "point_stream", stream, "losses", losses, flush=True)
        del tr; torch.cuda.empty_cache()
