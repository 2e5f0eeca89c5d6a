"""Where a whole model comes from: a named LLaMA-architecture config (random weights) or a local Hugging Face directory.

The e2e and accuracy suites fine-tune whole models. Nothing is ever downloaded: named models are built from
transformers configs with random init; a local directory is loaded with `local_files_only=True`. A directory
that holds only a config.json (any causal-LM architecture that ships with transformers: Qwen2, Gemma, Mistral,
...) is built from it with random weights, as a named model is: speed does not depend on the weights' values.

Loading a directory someone else made is loading their code if we let it: a pickled checkpoint
(`pytorch_model.bin`, `*.pt`) can run arbitrary Python when unpickled, and `auto_map` in config.json asks
transformers to import the directory's own modeling code. So by default only safetensors weights load and
remote code is never trusted; a pickled checkpoint needs `allow_pickle=True` (the CLI's `--allow-pickle`),
and a directory that needs remote code is refused outright (`trust_remote_code` is never passed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from falqon_bench.data.errors import BenchInputError

if TYPE_CHECKING:  # torch stays out of readers that only need the names
    import torch
    from torch import nn

TINY_LLAMA = "tiny-llama"
SMALL_LLAMA = "small-llama"
# LLaMA-architecture sizes of falqon_bench.suites.layers (Mistral-7B's too: GQA LLaMA blocks), plus a 70B-class
# config for "does it fit" runs
LLAMA_MODELS = ("llama-7b", "llama-13b", "llama-3-8b", "mistral-7b", "llama-70b")
# keys of a family config that a LlamaConfig must not take over: Mistral's model type, and its sliding window
# (Mistral-7B v0.1's 4096-token window; v0.2 and later attend to the full context, as LLaMA blocks do)
_NOT_LLAMA_KEYS = ("model_type", "sliding_window")
MODEL_NAMES = (TINY_LLAMA, SMALL_LLAMA, *LLAMA_MODELS)

SAFE_WEIGHT_SUFFIXES = (".safetensors",)
PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_model_dir(spec: str | Path) -> bool:
    """A model spec names a local directory (rather than a built-in config) when it is an existing path."""
    return Path(spec).is_dir()


def beside_suite(spec: str, suite_file: Path | str | None) -> str:
    """A relative path from a suite file that does not exist from here but does next to the suite file, resolved
    there (suites/models/qwen2.5-7b from suites/e2e-qwen.toml works from any working directory); else as given."""
    if Path(spec).exists() or not isinstance(suite_file, Path) or Path(spec).is_absolute():
        return spec
    beside = suite_file.parent / spec
    return str(beside.resolve()) if beside.exists() else spec


def model_beside(spec: str, suite_file: Path | str | None) -> str:
    """A suite's `model`: a named model as it is, a directory path through `beside_suite`."""
    return spec if spec in MODEL_NAMES else beside_suite(spec, suite_file)


def llama_config(model_name: str, num_layers: int | None = None):
    """The transformers LlamaConfig of a named model; `num_layers` overrides the depth (e.g. to fit memory).

    tiny-llama (hidden 64, 2 layers, vocab 256) is for CPU tests; small-llama (hidden 256, 4 layers, vocab 512)
    is the CPU-trainable base of the accuracy suite; the rest are the published LLaMA sizes, and Mistral-7B's as
    LLaMA blocks (full attention: its v0.2+ form).
    """
    from transformers import LlamaConfig

    if model_name == TINY_LLAMA:
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=256, max_position_embeddings=2048,
        )
    elif model_name == SMALL_LLAMA:
        config = LlamaConfig(
            hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=2048,
        )
    elif model_name == "llama-70b":
        config = LlamaConfig(
            hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        )
    elif model_name in LLAMA_MODELS:
        from falqon_bench.suites.layers import _llama_family_configs

        family = _llama_family_configs()[model_name].to_dict()
        config = LlamaConfig(**{k: v for k, v in family.items() if k not in _NOT_LLAMA_KEYS})
    else:
        raise BenchInputError(
            f"unknown model {model_name!r}; allowed: {', '.join(MODEL_NAMES)}, or the path of a local Hugging Face "
            "model directory (config.json + *.safetensors)"
        )
    if num_layers is not None:
        if int(num_layers) < 1:
            raise BenchInputError(f"layers must be >= 1 (got {num_layers})")
        set_depth(config, num_layers)
    return config


def set_depth(config, num_layers: int) -> None:
    """Give a transformers config `num_layers` decoder layers, with its per-layer lists resized to match (Qwen2's and
    Gemma-2's `layer_types`: cut, or repeated in their pattern), which the model indexes per layer."""
    depth = int(num_layers)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and layer_types:
        config.layer_types = [layer_types[i % len(layer_types)] for i in range(depth)]
    config.num_hidden_layers = depth


def check_model_dir(path: str | Path, allow_pickle: bool = False) -> Path:
    """Refuse a model directory that would run code on load; return the directory.

    Raises BenchInputError (exit 2 in the CLI) when config.json is missing or unreadable, when it asks for
    remote code (`auto_map`), or when its only weights are pickled and `allow_pickle` is False.
    """
    root = Path(path)
    config_file = root / "config.json"
    if not config_file.is_file():
        raise BenchInputError(f"{root}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchInputError(f"{config_file}: unreadable config.json ({e})") from None
    if not isinstance(config, dict):
        raise BenchInputError(f"{config_file}: config.json must hold a JSON object")
    if "auto_map" in config:
        raise BenchInputError(
            f"{config_file}: the model asks for remote code (auto_map = {sorted(config['auto_map'])}); "
            "falqon-bench never runs a model directory's own Python (trust_remote_code is always off). "
            "Use a model whose architecture ships with transformers (e.g. LlamaForCausalLM)."
        )
    safe, pickled = weight_files(root)
    if not safe and not pickled:
        _check_config_only(config_file, config)
        return root
    if not safe and not allow_pickle:
        raise BenchInputError(
            f"{root}: holds only pickled weights ({', '.join(sorted(p.name for p in pickled))}); unpickling a file "
            "can run arbitrary code, so it is refused by default. Convert it to safetensors, or pass "
            "--allow-pickle (allow_pickle = true) if you trust whoever made it."
        )
    return root


def weight_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickled checkpoint files) directly in a model directory."""
    files = [p for p in root.iterdir() if p.is_file()]
    return ([p for p in files if p.name.endswith(SAFE_WEIGHT_SUFFIXES)],
            [p for p in files if p.name.endswith(PICKLED_WEIGHT_SUFFIXES)])


def has_weights(root: str | Path) -> bool:
    """Whether a (checked) model directory holds weights; without, it is built from its config with random weights."""
    safe, pickled = weight_files(Path(root))
    return bool(safe or pickled)


def _check_config_only(config_file: Path, config: dict) -> None:
    """A directory with a config and no weights builds with random weights: its model_type must name a causal LM
    that transformers ships (its own modeling code, never the directory's)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BenchInputError(
            f"{config_file.parent}: no weights (*.safetensors) and config.json's model_type = {model_type!r} is not a "
            "causal LM that transformers ships, so it cannot be built with random weights either. Add the model's "
            "*.safetensors, or write a config.json whose model_type is a causal LM's, e.g. \"llama\", \"mistral\", "
            f"\"qwen2\", \"gemma\", \"phi3\" ({len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} in this transformers: "
            "transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)"
        )


def check_dir_layers(path: str | Path, config: dict, num_layers: int | None) -> None:
    """Refuse `layers` deeper than a model directory's own: from_pretrained would add randomly initialized layers.
    A directory without weights builds every layer with random weights anyway, so any depth is fine there."""
    if not has_weights(path):
        return
    depth = config.get("num_hidden_layers")
    if num_layers is not None and isinstance(depth, int) and int(num_layers) > depth:
        raise BenchInputError(
            f"layers = {num_layers} exceeds the {depth} decoder layers of the model directory {path}; "
            f"give layers <= {depth} (or leave it out for the model's own depth)"
        )


def load_model_dir(path: str | Path, device: "torch.device", dtype: "torch.dtype", allow_pickle: bool = False,
                   num_layers: int | None = None, seed: int = 0) -> "nn.Module":
    """A causal LM from a checked local directory (`check_model_dir`), never from a hub, never remote code; a
    directory with only a config is built from it with random weights (`seed`), any depth `num_layers`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = check_model_dir(path, allow_pickle)
    safe, pickled = weight_files(root)
    config = AutoConfig.from_pretrained(root, local_files_only=True, trust_remote_code=False)
    check_dir_layers(root, config.to_dict(), num_layers)
    if num_layers is not None:
        set_depth(config, num_layers)
    if not safe and not pickled:
        return build_model(config, device, dtype, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(
        root, config=config, local_files_only=True, trust_remote_code=False,
        use_safetensors=bool(safe), torch_dtype=dtype,
    )
    return model.to(device=device, dtype=dtype)


def build_model(config, device: "torch.device", dtype: "torch.dtype", seed: int = 0) -> "nn.Module":
    """The config's causal LM with random init (LlamaForCausalLM for the named models), made directly on `device` in
    `dtype`; same seed -> same weights everywhere."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config) if type(config) is LlamaConfig else AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype)


def make_model(spec: str, device: "torch.device", dtype: "torch.dtype", num_layers: int | None = None,
               seed: int = 0, allow_pickle: bool = False) -> "nn.Module":
    """The one entry point: a named config (random weights, `seed`) or a local model directory (checked).

    The model is for fine-tuning, so its forward builds no KV cache (`use_cache = False`): with the default, a
    training forward of a transformers LLaMA fills a DynamicCache it never reads (extra copies and memory in every
    step, and torch.compile recompiles on the cache's state).
    """
    if is_model_dir(spec):
        model = load_model_dir(spec, device, dtype, allow_pickle=allow_pickle, num_layers=num_layers, seed=seed)
    else:
        model = build_model(llama_config(spec, num_layers), device, dtype, seed=seed)
    model.config.use_cache = False
    return model
