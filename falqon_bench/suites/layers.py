"""Named linear-layer shapes of real LLMs, taken from their transformers configs (built in code, never downloaded).

A shape is one nn.Linear(K -> N) of a transformer block; `per_block` counts how many linears of that shape
one block holds, so a report can sum a block's cost (e.g. llama-7b: attn x4 (q,k,v,o), up x2 (gate,up),
down x1). Names are '<model>.<layer>' ('llama-7b.attn'); a bare model name ('llama-7b') means all its layers, and so
does the path of a directory holding a model's config.json (layers_of_model_dir).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class LayerShape:
    """One linear layer: K input features, N output features, `per_block` such linears per transformer block."""

    name: str
    K: int
    N: int
    per_block: int = 1
    source: str = ""


def _llama_family_configs() -> dict[str, object]:
    """The published sizes of each model, as transformers config objects (imported lazily: transformers is slow)."""
    from transformers.models.llama.configuration_llama import LlamaConfig
    from transformers.models.mistral.configuration_mistral import MistralConfig

    return {
        "llama-7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
        "llama-13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40),
        "llama-3-8b": LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128
        ),
        "mistral-7b": MistralConfig(
            hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128
        ),
    }


MODEL_NAMES = ("llama-7b", "llama-13b", "llama-3-8b", "mistral-7b")


def layers_of_config(model: str, config) -> list[LayerShape]:
    """attn (q,o and, without GQA, k,v: hidden->hidden), kv (GQA only: hidden->kv_heads*head_dim), up (gate,up), down."""
    hidden, inter = int(config.hidden_size), int(config.intermediate_size)
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    source = f"transformers {type(config).__name__}"
    gqa = kv_heads != heads
    shapes = [LayerShape(f"{model}.attn", hidden, heads * head_dim, 2 if gqa else 4, source)]
    if gqa:
        shapes.append(LayerShape(f"{model}.kv", hidden, kv_heads * head_dim, 2, source))
    shapes.append(LayerShape(f"{model}.up", hidden, inter, 2, source))
    shapes.append(LayerShape(f"{model}.down", inter, hidden, 1, source))
    return shapes


@lru_cache(maxsize=1)
def named_layers() -> dict[str, LayerShape]:
    """Every named shape, 'llama-7b.attn' -> LayerShape, in a stable order."""
    table: dict[str, LayerShape] = {}
    for model, config in _llama_family_configs().items():
        for shape in layers_of_config(model, config):
            table[shape.name] = shape
    return table


def allowed_layer_names() -> list[str]:
    """What a suite may write in `layers`: model names (all their layers) and '<model>.<layer>' names."""
    return list(MODEL_NAMES) + list(named_layers())


def resolve_layer(name: str) -> list[LayerShape]:
    """'llama-7b.attn' -> [that shape]; 'llama-7b' -> all its layers. KeyError (with the allowed names) otherwise."""
    table = named_layers()
    if name in table:
        return [table[name]]
    if name in MODEL_NAMES:
        return [s for s in table.values() if s.name.startswith(name + ".")]
    raise KeyError(f"unknown layer {name!r}; allowed: {', '.join(allowed_layer_names())}")


def layers_of_model_dir(path: Path) -> list[LayerShape]:
    """Every layer of the model whose config.json is in directory `path` ('<dir name>.attn', '.kv' with GQA, '.up',
    '.down'), read as layers_of_config reads a named model's config: a user's own model (Qwen2.5, Gemma, ...) in
    a layer sweep without typing its widths. Only the json is read: no weights, no transformers import.
    ValueError (with what is missing) when the file is not a decoder config with those fields."""
    from types import SimpleNamespace

    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        fields = {key: config[key] for key in ("hidden_size", "intermediate_size", "num_attention_heads")}
        fields["num_key_value_heads"] = config.get("num_key_value_heads") or fields["num_attention_heads"]
        fields["head_dim"] = config.get("head_dim")
        shapes = layers_of_config(Path(path).resolve().name, SimpleNamespace(**fields))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"{config_file}: not a decoder model's config.json with hidden_size, intermediate_size and "
                         f"num_attention_heads ({type(e).__name__}: {e})") from None
    return [LayerShape(sh.name, sh.K, sh.N, sh.per_block, str(config_file)) for sh in shapes]


def custom_layer(K: int, N: int, name: str | None = None, per_block: int = 1) -> LayerShape:
    """An inline shape from a suite table {name, K, N}; unnamed ones are called 'custom.KxN'."""
    return LayerShape(name or f"custom.{K}x{N}", int(K), int(N), int(per_block), "inline")
