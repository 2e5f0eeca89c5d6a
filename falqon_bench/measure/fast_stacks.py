"""The fastest stacks users fine-tune LLaMA models with, as surroundings and baselines for the e2e suite.

A user deciding whether FP8 LoRA is worth it compares it with the fastest BF16 / 4-bit LoRA stack they can
install, not with plain eager PEFT. About a third of a LLaMA-7B step's GPU time is unfused elementwise work
around the linears (RMSNorm, SwiGLU, RoPE, casts, the loss over the vocabulary). Two libraries fuse it:

- liger-kernel (`apply_liger`): fused Triton RMSNorm, SwiGLU, RoPE and linear + cross-entropy, applied to
  one model instance for any method. The methods' linears stay the method's layers: the SwiGLU and
  attention forwards call `self.gate_proj(...)` etc., whatever module sits there.
- Unsloth (`build_unsloth_model`): its own fused LoRA kernels, so it is a baseline of its own
  (`unsloth_lora`, `unsloth_qlora`), built from a local model directory; nothing is downloaded.

Both are optional (`pip install -e ".[fast]"` for liger-kernel; `pip install -e ".[unsloth]"` for Unsloth, see the README);
each has an `*_unavailable_reason` that says in one line why it cannot run here and what to install, so an
e2e point records "unsupported: <reason>" instead of crashing.

In an e2e suite the Unsloth baselines are method names like any other (`methods = ["falqon", "unsloth_lora"]`):
`check_stack_point` refuses, before any model is built, what cannot run (StackUnsupported, recorded as
"unsupported: <reason>"), and `convert_for_point` builds Unsloth's model where the other methods are converted
by falqon_core, so both are timed by the same step in the same modes.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from falqon_bench.data.errors import BenchInputError
from falqon_core.methods import MethodUnavailable

if TYPE_CHECKING:
    import torch
    from torch import nn

LIGER_MIN_VERSION = "0.8.5"  # the version whose LLaMA patches this module reads (and the GPU check ran)
LIGER_PATCHES = ("rms_norm", "swiglu", "rope", "fused_linear_cross_entropy")
LIGER_INSTALL = f'pip install "liger-kernel>={LIGER_MIN_VERSION}" (or pip install -e ".[fast]")'

# e2e baseline name -> whether Unsloth loads the frozen weights in 4 bit (bitsandbytes NF4, its QLoRA)
UNSLOTH_BASELINES = {"unsloth_lora": False, "unsloth_qlora": True}
UNSLOTH_INSTALL = 'pip install -e ".[unsloth]" (unsloth and unsloth_zoo 2026.10.9, on a CUDA machine; pip moves transformers to 5.17)'


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_reason(library: str, device: "torch.device | str | None", why: str) -> str | None:
    """None when `device` (default: the first CUDA GPU) is a usable CUDA device, else a one-line reason."""
    import torch

    if device is not None and torch.device(device).type != "cuda":
        return f"{library} needs a CUDA GPU ({why}); device is {torch.device(device)}"
    if not torch.cuda.is_available():
        return f"{library} needs a CUDA GPU ({why}); torch sees none"
    return None


# ---------------------------------------------------------------------------------------------------------
# liger-kernel


def liger_unavailable_reason(device: "torch.device | str | None" = None) -> str | None:
    """None when liger-kernel's LLaMA patches can run on `device`; else why not and what to install.

    Liger's kernels are Triton-only. Under the CPU interpreter (TRITON_INTERPRET=1, triton 3.8) they do not
    run: scalar kernel arguments arrive as Python floats (`eps.to(tl.float32)` fails in RMSNorm and SwiGLU)
    and the fused loss returns NaN, so a CPU is refused rather than measured.
    """
    from packaging.version import Version

    version = _installed_version("liger-kernel")
    if version is None:
        return f"liger-kernel is not installed: {LIGER_INSTALL}"
    if Version(version) < Version(LIGER_MIN_VERSION):
        return f"liger-kernel {version} is older than {LIGER_MIN_VERSION}, the version this suite patches with: {LIGER_INSTALL}"
    return _cuda_reason("liger-kernel", device, "its fused kernels are Triton-only and fail in the CPU interpreter")


def apply_liger(model: "nn.Module", rope: bool = True) -> None:
    """Fuse the non-linear parts of a LLaMA model with liger-kernel, in place; call BEFORE the method converts it.

    Patched on this instance only: RMSNorm (every layer and the final norm), the SwiGLU MLP, RoPE in every
    attention layer, and the loss (fused lm_head + cross-entropy, which never materialises the tokens x vocab
    logits in training). The linears are untouched, so a method converting them afterwards (PEFT, torchao,
    bitsandbytes, FALQON's module swap) keeps its own layers inside the fused surroundings.
    Raises BenchInputError (one line: why, and what to install) when liger cannot run on the model's device.
    rope=False leaves RoPE unpatched, for a model that torch.compile will trace: the per-model RoPE patch runs
    the attention forward with a copy of its module's globals, and torch.compile resumes a nested graph break
    there with code it installed elsewhere ("NameError: name '__compiled_fn_...' is not defined": bf16_lora
    compile + liger on the H200, reproduced on CPU).
    """
    from falqon_core.convert import model_device

    reason = liger_unavailable_reason(model_device(model))
    if reason is not None:
        raise BenchInputError(f"liger = true is not possible here: {reason}")
    patch_llama_with_liger(model, rope=rope)


def patch_llama_with_liger(model: "nn.Module", rope: bool = True) -> None:
    """The patching of `apply_liger`, without the device check (so CPU tests can inspect the wiring).

    liger's `apply_liger_kernel_to_llama(model=...)` also rewrites transformers' module globals (the RMSNorm
    and MLP classes, RoPE), which would make every LLaMA built later in the process liger-patched too, a
    measurement "without liger" included. Here those globals are restored after the call, and RoPE (which
    liger can only patch globally) is patched per attention module instead.

    The fused loss reads `model.lm_head.weight` directly (skipping lm_head's forward), so lm_head must be a
    plain nn.Linear; the methods never convert it (they target the decoder's projections). A frozen lm_head
    is fine: liger computes no weight gradient for a weight that does not require one. Liger makes the inputs of
    its SwiGLU, RMSNorm and RoPE kernels contiguous first, so FALQON's outputs (with its cuBLAS GEMM, a view
    of the first N columns of an M x (N+r) buffer) are read correctly.
    """
    from torch import nn
    from liger_kernel.transformers import apply_liger_kernel_to_llama, liger_rotary_pos_emb
    from transformers import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        raise BenchInputError(
            f"liger patches a transformers LlamaForCausalLM before a method converts it; got {type(model).__name__}. "
            "Apply it to the freshly built model, then convert."
        )
    if type(model.lm_head) is not nn.Linear:
        raise BenchInputError(
            f"liger's fused loss reads lm_head.weight and skips lm_head's forward, so lm_head must be a plain "
            f"nn.Linear; it is a {type(model.lm_head).__name__} (was it converted before liger was applied?)"
        )
    with _llama_globals_restored():
        apply_liger_kernel_to_llama(
            model=model, rope=False, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
        )
    if rope:
        for layer in model.model.layers:
            attention = layer.self_attn
            forward = function_with_global(type(attention).forward, "apply_rotary_pos_emb", liger_rotary_pos_emb)
            attention.forward = types.MethodType(forward, attention)
    # what was patched, for the e2e row
    model._falqon_liger_patches = tuple(p for p in LIGER_PATCHES if rope or p != "rope")


def liger_patches_of(model: "nn.Module") -> tuple[str, ...]:
    """The liger patches applied to `model` (empty when none), as apply_liger recorded them on the instance."""
    return tuple(getattr(model, "_falqon_liger_patches", ()))


@contextlib.contextmanager
def _llama_globals_restored() -> Iterator[None]:
    """Undo, on exit, the process-wide rewrites liger makes to transformers' LLaMA module and loss module."""
    from transformers.models.llama import modeling_llama

    names = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")
    saved = {name: getattr(modeling_llama, name) for name in names}
    saved_class_forward = modeling_llama.LlamaForCausalLM.__dict__["forward"]
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(modeling_llama, name, value)
        modeling_llama.LlamaForCausalLM.forward = saved_class_forward


def function_with_global(fn: Callable[..., Any], name: str, value: Any) -> Callable[..., Any]:
    """A copy of `fn` that sees `value` for the module global `name`; `fn` and its module are unchanged.

    `fn` may be wrapped by decorators that keep the inner function in a closure cell and in `__wrapped__`
    (functools.wraps; transformers' deprecate_kwarg): the innermost function gets the new globals and each
    wrapper is rebuilt around the copy. No global is mutated at call time, so torch.compile traces it as is.
    """
    inner = getattr(fn, "__wrapped__", None)
    cells = fn.__closure__ or ()
    new_inner = None
    if inner is not None and any(_cell_holds(cell, inner) for cell in cells):
        new_inner = function_with_global(inner, name, value)
        cells = tuple(types.CellType(new_inner) if _cell_holds(cell, inner) else cell for cell in cells)
        fn_globals = fn.__globals__
    elif name in fn.__code__.co_names:
        fn_globals = {**fn.__globals__, name: value}
    else:
        raise BenchInputError(
            f"{fn.__qualname__} does not use the global {name!r}; this transformers version calls RoPE "
            "differently, so liger's RoPE cannot be patched per model"
        )
    rebuilt = types.FunctionType(fn.__code__, fn_globals, fn.__name__, fn.__defaults__, cells or None)
    rebuilt.__kwdefaults__ = fn.__kwdefaults__
    rebuilt.__dict__.update(fn.__dict__)  # functools.wraps' attributes, __wrapped__ among them
    if new_inner is not None:
        rebuilt.__wrapped__ = new_inner
    rebuilt.__qualname__ = fn.__qualname__
    return rebuilt


def _cell_holds(cell: types.CellType, obj: object) -> bool:
    try:
        return cell.cell_contents is obj
    except ValueError:  # an empty cell
        return False


# ---------------------------------------------------------------------------------------------------------
# Unsloth

# the libraries whose versions Unsloth pins and this suite also uses: a pin they miss is the reason shown
UNSLOTH_PINNED = ("torch", "transformers", "peft", "bitsandbytes", "triton")
# modules unsloth 2026.10.9 imports on its GPU path (found by importing it with --no-deps, one missing module
# at a time, with trl 1.15.0 and datasets 4.3.0, which imports httpx): its other Requires-Dist (xformers,
# torchvision, diffusers, ...) are optional at run time
UNSLOTH_IMPORTS = ("unsloth_zoo", "trl", "datasets", "multiprocess", "dill", "xxhash", "httpx")
# set before Unsloth is imported: no hub access, no usage statistics (it downloads a README to count users)
UNSLOTH_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}


def unsloth_unavailable_reason(device: "torch.device | str | None" = None) -> str | None:
    """None when the Unsloth baselines can run on `device`; else the precise reason (a pin, a module, no GPU).

    Reads package metadata only: importing Unsloth patches transformers, PEFT and torch process-wide, which
    would change every other method measured in the same process, so it is imported only to build its model.
    """
    version = _installed_version("unsloth")
    if version is None:
        return f"unsloth is not installed: {UNSLOTH_INSTALL}"
    pin = unmet_pin(f"unsloth {version}", importlib.metadata.requires("unsloth") or [], UNSLOTH_PINNED)
    if pin is not None:
        return pin
    missing = [name for name in UNSLOTH_IMPORTS if importlib.util.find_spec(name) is None]
    if missing:
        return f"unsloth {version} imports {', '.join(missing)}, not installed here (pip install {' '.join(missing)})"
    return _cuda_reason(
        "unsloth", device, "without one it falls back to stock transformers + PEFT, i.e. bf16_lora, not its kernels"
    )


def unmet_pin(who: str, requirements: list[str], packages: tuple[str, ...]) -> str | None:
    """The first of `packages` whose installed version misses its pin in `requirements` (Requires-Dist lines).

    Returns e.g. "unsloth 2026.10.9 requires transformers<=5.17.0,>=4.52.4; this environment has 5.24.0";
    None when every pinned package that is installed satisfies its pin. Markers (platform, extras) count.
    """
    from packaging.requirements import Requirement
    from packaging.version import Version

    for line in requirements:
        requirement = Requirement(line)
        if requirement.name.lower() not in packages or not requirement.specifier:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        installed = _installed_version(requirement.name)
        if installed is None:
            continue
        if not requirement.specifier.contains(Version(installed).base_version, prereleases=True):
            return f"{who} requires {requirement.name}{requirement.specifier}; this environment has {installed}"
    return None


def save_model_dir(model: "nn.Module", directory: str | Path) -> Path:
    """Write `model` as a local Hugging Face directory: config.json, *.safetensors and a word-level tokenizer.

    Loaders that insist on a tokenizer (Unsloth's FastLanguageModel) get one that needs no download: ids 0, 1, 2
    are <unk>, <s>, </s> and every other id i < vocab_size is the word "t<i>", so ids and the embedding agree.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root, safe_serialization=True)
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab = {**specials, **{f"t{i}": i for i in range(len(specials), int(model.config.vocab_size))}}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", pad_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(root)
    return root


def build_unsloth_model(
    baseline: str, model: "nn.Module", rank: int, max_seq_length: int, workdir: str | Path, seed: int = 0
) -> "tuple[nn.Module, list[nn.Parameter]]":
    """(Unsloth's LoRA model, its trainable tensors) for `baseline` in UNSLOTH_BASELINES, from `model`'s weights.

    `model` (built by falqon_bench.suites.models.make_model: a named config with random weights or a local directory)
    is saved to `workdir` as safetensors, moved to the meta device (its device memory is released even where the
    caller keeps a reference; `model` is unusable afterwards) and loaded back through
    FastLanguageModel.from_pretrained with hub access off, in training mode; unsloth_qlora loads the frozen weights in 4 bit (bitsandbytes NF4), unsloth_lora in 16 bit.
    Adapters as in the suite's other LoRA methods: the decoder's 7 projections, alpha = r, no dropout, no
    bias, and gradient checkpointing off (Unsloth's default "unsloth" offloads activations, trading time for
    memory, which no other method here does). Raises BenchInputError when Unsloth cannot run here.
    """
    if baseline not in UNSLOTH_BASELINES:
        raise BenchInputError(f"unknown Unsloth baseline {baseline!r}; allowed: {', '.join(UNSLOTH_BASELINES)}")
    from falqon_core.convert import LLAMA_TARGET_MODULES
    from falqon_core.methods.qlora_nf4 import bitsandbytes_quantize_ordered

    reason = unsloth_unavailable_reason()
    if reason is not None:
        raise BenchInputError(f"{baseline} is not possible here: {reason}")
    directory = save_model_dir(model, Path(workdir) / "model")
    dtype = model.dtype
    model.to("meta")  # the copy on disk is the one Unsloth loads: free the device memory, even if the caller holds `model`
    del model
    FastLanguageModel = import_unsloth(workdir).FastLanguageModel

    # loading in 4 bit quantizes through bitsandbytes, whose kernels ignore the point's stream (see the helper)
    with bitsandbytes_quantize_ordered("cuda"):
        unsloth_model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(directory),
            max_seq_length=max_seq_length,
            dtype=dtype,
            load_in_4bit=UNSLOTH_BASELINES[baseline],
            load_in_16bit=not UNSLOTH_BASELINES[baseline],
            local_files_only=True,
            use_exact_model_name=True,
            use_gradient_checkpointing=False,
            random_state=seed,
        )
    unsloth_model = FastLanguageModel.get_peft_model(
        unsloth_model,
        r=rank,
        target_modules=list(LLAMA_TARGET_MODULES),
        lora_alpha=rank,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing=False,
        random_state=seed,
        temporary_location=str(Path(workdir) / "unsloth_temporary_saved_buffers"),  # default: the current directory
    )
    FastLanguageModel.for_training(unsloth_model, use_gradient_checkpointing=False)
    return unsloth_model, [p for p in unsloth_model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------------
# The fast stacks inside an e2e suite (falqon_bench.suites.e2e_suite / e2e_step)

STACK_BASELINES = tuple(UNSLOTH_BASELINES)  # e2e method names built by their own library, not by falqon_core
# liger's fused lm_head + cross-entropy counts the non-ignored labels with `.item()` on every forward
# (liger_kernel/ops/fused_linear_cross_entropy.py), a host sync that a CUDA graph cannot capture
LIGER_GRAPH_REASON = ("liger-kernel's fused loss reads a count back to the host (.item()) on every forward, "
                      "which a CUDA graph cannot capture; run liger = true in eager or compile mode")


class StackUnsupported(MethodUnavailable):
    """An e2e point that cannot run as asked (Unsloth missing or pinned out, liger in a CUDA graph, ...).

    Recorded as the point's row, never raised out of the run: error_type "unsupported", error "unsupported: <why>".
    """

    label = "unsupported"


def is_stack_baseline(method: str) -> bool:
    """Whether `method` is an e2e baseline that its own library builds (Unsloth), not a falqon_core method."""
    return method in STACK_BASELINES


def stack_point_unsupported_reason(point: dict[str, Any], device: "torch.device | str | None") -> str | None:
    """Why an e2e point cannot run as asked, known before any model is built; None when it can (or may) run.

    point["options"] holds mode, liger and world_size (falqon_bench.suites.e2e_suite). Checked: liger in a whole-step
    CUDA graph, or where it cannot run (`liger_unavailable_reason`); for the Unsloth baselines, liger on top (Unsloth fuses the same parts with its own kernels),
    more than one process (importing Unsloth patches transformers and PEFT process-wide, and the suite's
    DDP wrapper is not Unsloth's), and `unsloth_unavailable_reason`.
    """
    from falqon_bench.suites.e2e_suite import GRAPH_MODES

    options = point.get("options") or {}
    if not is_stack_baseline(point["method"]):
        if not options.get("liger"):
            return None
        if options.get("mode") in GRAPH_MODES:
            return LIGER_GRAPH_REASON
        reason = liger_unavailable_reason(device)
        return None if reason is None else f"liger = true is not possible here: {reason}"
    if options.get("liger"):
        return (f"{point['method']} with liger = true: Unsloth fuses RMSNorm, SwiGLU, RoPE and the loss with its own "
                "kernels; liger-kernel applies to the suite's other methods")
    if int(options.get("world_size") or 1) > 1:
        return (f"{point['method']} runs in one process on one GPU (importing Unsloth patches transformers and PEFT "
                "process-wide); run it with `falqon-bench run`, not under torchrun")
    return unsloth_unavailable_reason(device)


def check_stack_point(point: dict[str, Any], device: "torch.device | str | None") -> None:
    """Raise StackUnsupported (one line: why) when `stack_point_unsupported_reason` has a reason.

    For an Unsloth point that can run, import Unsloth now, before the point's model is built: Unsloth patches
    transformers, PEFT and TRL when imported and warns that it runs slower when they were imported first.
    """
    reason = stack_point_unsupported_reason(point, device)
    if reason is not None:
        raise StackUnsupported(reason)
    if is_stack_baseline(point["method"]):
        import_unsloth()


def import_unsloth(workdir: str | Path | None = None) -> types.ModuleType:
    """The `unsloth` module, imported with hub access and usage statistics off (UNSLOTH_OFFLINE_ENV).

    Its compiled-module cache goes to $UNSLOTH_COMPILE_LOCATION when set, else under `workdir` (or $TMPDIR).
    Raises StackUnsupported when this process imported transformers first: Unsloth's patches would then be
    partial (it says so itself) and would change every model built later in the process, so an Unsloth point
    needs a process of its own (`falqon-bench run`'s default --isolate gives each method one).
    """
    import sys
    import tempfile

    if "unsloth" not in sys.modules and "transformers" in sys.modules:
        raise StackUnsupported(
            "Unsloth must be imported before transformers in its process, and this one has imported transformers already "
            "(another method ran here); "
            "run the Unsloth baselines with `falqon-bench run` (its default --isolate gives each method a process)"
        )
    os.environ.update(UNSLOTH_OFFLINE_ENV)
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(Path(workdir or tempfile.gettempdir()) / "unsloth_compiled_cache"))
    import unsloth

    return unsloth


@dataclass
class UnslothStack:
    """What the e2e step needs of a method, for a model Unsloth built: its trainable tensors, no post-step work."""

    name: str

    def trainable_parameters(self, model: "nn.Module") -> "list[nn.Parameter]":
        return [p for p in model.parameters() if p.requires_grad]

    def after_optimizer_step(self, model: "nn.Module") -> None:
        """Nothing: LoRA adapters are plain parameters that AdamW updated."""


def convert_for_point(model: "nn.Module", point: dict[str, Any], adapter: Any) -> "tuple[nn.Module, Any]":
    """(trainable model, method) for an e2e point: falqon_core's `convert_model`, or Unsloth's model for its baselines.

    For unsloth_lora / unsloth_qlora, `model` (the point's freshly built model; its device memory is released)
    is saved to a temporary directory under $TMPDIR and loaded by Unsloth (`build_unsloth_model`) with the
    point's rank, seq_len and seed; the saved weights are deleted once loaded. Unsloth takes no method options.
    """
    if not is_stack_baseline(point["method"]):
        from falqon_core.convert import convert_model

        return convert_model(model, point["method"], adapter)
    import shutil
    import tempfile

    options = point["options"]
    if options.get("method_options"):
        raise BenchInputError(f"{point['method']} takes no method options; got {sorted(options['method_options'])}")
    workdir = Path(tempfile.mkdtemp(prefix=f"falqon-{point['method']}-"))
    unsloth_model, _ = build_unsloth_model(point["method"], model, int(point["rank"]), int(options["seq_len"]),
                                           workdir, seed=int(options.get("seed", 0)))
    shutil.rmtree(workdir / "model", ignore_errors=True)  # gigabytes of safetensors; Unsloth holds its own copy
    return unsloth_model, UnslothStack(point["method"])
