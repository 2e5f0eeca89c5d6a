"""The e2e model's mask-free causal attention computes what transformers' masked attention computes."""

import torch

from falqon_bench.measure.causal_attention import NAME, use_maskless_causal_sdpa
from falqon_bench.suites.models import make_model


def _model(attn: str):
    model = make_model("tiny-llama", torch.device("cpu"), torch.float32, num_layers=2, seed=0)
    model.set_attn_implementation(attn)
    return model


def test_maskless_causal_sdpa_gives_the_masked_eager_attention_loss():
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    eager = _model("eager")  # an explicit causal mask tensor, softmax in torch
    want = eager(input_ids=tokens, labels=tokens).loss
    model = _model("sdpa")
    use_maskless_causal_sdpa(model)
    assert model.config._attn_implementation == NAME
    got = model(input_ids=tokens, labels=tokens).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # without the causal masking it would see the future


def test_a_model_on_another_attention_implementation_is_left_alone():
    model = _model("eager")
    use_maskless_causal_sdpa(model)
    assert model.config._attn_implementation == "eager"
