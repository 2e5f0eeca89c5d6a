"""Causal attention without a mask tensor, the same in eager, compiled and CUDA-graph steps.

Why: transformers' SDPA path decides per call whether the causal mask can be skipped (then SDPA runs
with is_causal=True, the flash kernel). Some versions refuse the skip while a CUDA stream is capturing, so the
captured step materialised a 2-D mask that the warm-up steps never had: attention took a different kernel in the
graph than in eager, and a torch.compile'd decoder layer, guarded on `attention_mask is None`, recompiled during the
capture, where inductor cannot run (H200, transformers + torch 2.11: "operation not permitted when stream is
capturing"). e2e batches are unpadded full-length sequences, so plain causal attention needs no mask: the model
gets an attention implementation whose mask is always None and whose attention is transformers' own SDPA forward.
"""

from __future__ import annotations

from typing import Any

from torch import nn

NAME = "falqon_causal_sdpa"


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask function of NAME: no mask tensor (SDPA's is_causal does the masking)."""
    return None


def use_maskless_causal_sdpa(model: nn.Module) -> None:
    """Switch `model` (a transformers causal LM on SDPA) to NAME. A model on another attention implementation
    (eager, flash_attention_2, ...) is left as it is: it was chosen on purpose."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, sdpa_attention_forward)
    AttentionMaskInterface.register(NAME, _no_mask)
    model.set_attn_implementation(NAME)
