"""Why does torch.compile of a FALQON-converted LLaMA fail on the GPU? One decoder layer, one step, full traceback."""

import traceback

import torch

from falqon_bench.suites.models import make_model
from falqon_core.convert import LLAMA_TARGET_MODULES, convert_model
from falqon_core.methods.base import AdapterConfig

model = make_model("llama-7b", torch.device("cuda"), torch.bfloat16, num_layers=1)
model, method = convert_model(model, "falqon", AdapterConfig(rank=16, target_modules=LLAMA_TARGET_MODULES))
tokens = torch.randint(0, 32000, (1, 256), device="cuda")
step = torch.compile(lambda t: model(input_ids=t, labels=t).loss)
try:
    step(tokens).backward()
    print("compiled falqon step: ok")
except Exception:
    traceback.print_exc()
