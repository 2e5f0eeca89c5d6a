"""The kernel classes of a whole e2e step and the floor arithmetic (falqon_bench.measure.e2e_floor), on CPU.

Kernel names are the ones the H100/H200 profiles of this project show (cuBLAS, flash attention, torch's
multi-tensor AdamW, FALQON's Triton kernels, inductor's fused kernels, bitsandbytes).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from falqon_bench.measure.e2e_floor import (
    STEP_CLASSES,
    classify_kernel,
    e2e_floor_ms,
    kernel_class_ms,
    lm_head_floor_ms,
    llama_linear_shapes,
)
from falqon_core.methods.base import StepCost

KERNELS = {
    "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT": "gemm",
    "sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1_execute_segment_k_off": "gemm",
    "_melded_gemm_kernel": "gemm",
    "triton_tem_fused_mm_3": "gemm",
    "kgemm_4bit_inference_naive<__nv_bfloat16, 128, 16>": "gemm",
    "_partial_amax_kernel": "quantize",
    "_cast_tensorwise_kernel": "quantize",
    "_transpose_bytes_kernel": "quantize",
    "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, __nv_bfloat16*, int, int)": "quantize",
    "triton_red_fused_abs_max_0": "quantize",
    "triton_poi_fused__to_copy_clamp_mul_reciprocal_1": "quantize",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>>": "attention",
    "fmha_cutlassB_bf16_aligned_128x64_k128_sm80": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": "attention",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>>": "optimizer",
    "_merge_rows_variant_kernel": "proxy_update",
    "_merge_rows_kernel": "proxy_update",
    "void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>(at::cuda::detail::TensorInfo<float, unsigned int>)": "proxy_update",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "elementwise",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float>>>": "elementwise",
    "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0": "elementwise",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::LogSoftMaxForwardEpilogue>": "elementwise",
    "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>": "elementwise",
    "Memset (Device)": "elementwise",
    "some_unknown_kernel_xyz": "other",
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_each_kernel_of_a_step_lands_in_its_class(name):
    assert classify_kernel(name) == KERNELS[name]


def test_class_split_sums_every_kernel_once_per_step():
    kernels = [("nvjet_a", 3000.0), ("nvjet_b", 1000.0), ("_partial_amax_kernel", 400.0), ("flash_fwd_kernel", 600.0),
               ("_merge_rows_kernel", 200.0), ("weird", 100.0)]
    split = kernel_class_ms(kernels, steps=2)
    assert list(split) == list(STEP_CLASSES)
    assert split == pytest.approx({"gemm": 2.0, "quantize": 0.2, "attention": 0.3, "optimizer": 0.0,
                                   "proxy_update": 0.1, "elementwise": 0.0, "other": 0.05})
    assert sum(split.values()) == pytest.approx(sum(us for _, us in kernels) / 1e3 / 2)
    with pytest.raises(ValueError):
        kernel_class_ms(kernels, steps=0)


# the fields of a transformers LlamaConfig that the floor reads (head_dim None: hidden / heads, as LlamaConfig)
CONFIG = SimpleNamespace(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, head_dim=None)
PEAKS = {"bf16_tflops": 1000.0, "fp8_tflops": 2000.0, "copy_gb_per_s": 2000.0}


def test_llama_linear_shapes_follow_the_config_including_grouped_kv_heads():
    assert llama_linear_shapes(CONFIG) == [("q_proj", 64, 64), ("k_proj", 64, 32), ("v_proj", 64, 32), ("o_proj", 64, 64),
                                           ("gate_proj", 64, 128), ("up_proj", 64, 128), ("down_proj", 128, 64)]
    # a query width apart from the hidden size (Gemma-7B: 16 heads x 256 on 3072): q widens, o narrows back
    gemma = SimpleNamespace(hidden_size=3072, intermediate_size=24576, num_attention_heads=16, num_key_value_heads=16,
                            head_dim=256)
    assert llama_linear_shapes(gemma)[:4] == [("q_proj", 3072, 4096), ("k_proj", 3072, 4096), ("v_proj", 3072, 4096),
                                              ("o_proj", 4096, 3072)]


class FixedCost:
    """A method whose every linear costs 2 TFLOP of bf16 GEMM and 1 GB of traffic: 2 ms + 0.5 ms at PEAKS."""

    def step_cost(self, K, N, rank, tokens, options=None):
        return StepCost(gemm_flops={"bf16": 2e12}, quant_bytes=1e9)


def test_floor_is_the_linears_roofline_plus_the_lm_head_plus_the_measured_rest():
    classes = {"gemm": 50.0, "quantize": 9.0, "attention": 4.0, "optimizer": 1.0, "proxy_update": 2.0,
               "elementwise": 20.0, "other": 0.5}
    parts = e2e_floor_ms(FixedCost(), CONFIG, rank=16, tokens=4096, peaks=PEAKS, classes_ms=classes)
    head = 4 * 4096 * 64 * 256 / 1e15 * 1e3
    assert parts["linears"] == pytest.approx(2.5 * 7 * 2)  # 7 linears per block, 2 blocks
    assert parts["lm_head"] == pytest.approx(head) == pytest.approx(lm_head_floor_ms(CONFIG, 4096, PEAKS))
    assert parts["measured_rest"] == pytest.approx(4.0 + 1.0 + 20.0 + 0.5)  # not gemm, quantize, proxy_update
    assert parts["total"] == pytest.approx(35.0 + head + 25.5)


def test_floor_of_a_real_method_uses_its_step_cost_and_needs_peaks_and_a_split():
    from falqon_core.methods import get_method

    falqon = get_method("falqon")
    classes = dict.fromkeys(STEP_CLASSES, 0.0)
    parts = e2e_floor_ms(falqon, CONFIG, 16, 4096, PEAKS, classes)
    assert parts is not None and parts["linears"] > 0 and parts["total"] == pytest.approx(parts["linears"] + parts["lm_head"])
    assert e2e_floor_ms(falqon, CONFIG, 16, 4096, None, classes) is None  # CPU run: no peaks
    assert e2e_floor_ms(falqon, CONFIG, 16, 4096, PEAKS, None) is None  # no profile
    assert e2e_floor_ms(falqon, CONFIG, 16, 4096, {"bf16_tflops": 1000.0, "copy_gb_per_s": 2000.0}, classes) is None  # no fp8 peak


def _row(method, mode, wall, classes=None, floor=None):
    return {"kind": "e2e", "point_id": f"{method}-{mode}", "method": method, "mode": mode, "status": "ok", "wall_ms": wall,
            "gpu_ms": sum((classes or {}).values()) or None, "kernel_class_ms": classes,
            "floor_ms": floor and floor["total"], "floor_parts_ms": floor}


def test_report_floor_table_shows_the_split_the_floor_and_the_distance_to_it():
    from falqon_bench.readers.figures.e2e import floor_table

    classes = {"gemm": 150.0, "quantize": 30.0, "attention": 20.0, "optimizer": 2.0, "proxy_update": 1.5,
               "elementwise": 60.0, "other": 0.5}
    floor = {"linears": 100.0, "lm_head": 3.0, "measured_rest": 82.5, "total": 185.5}
    rows = [_row("falqon", "cuda_graph", 285.0, classes, floor), _row("bf16_lora", "compile", 281.0, classes, None),
            _row("qlora_nf4", "eager", 380.0)]
    table = floor_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 4  # header, rule, the two profiled rows (bf16_lora first: method order)
    assert lines[2].startswith("| bf16_lora | compile | 264.0 | 150.0 | 30.0 | 20.0 | 2.0 | 1.5 | 60.0 | 0.5 | - | -x |")
    assert "| 185.5 (100.0 + 3.0 + 82.5) | 1.54x |" in lines[3]
    assert floor_table([_row("falqon", "eager", 300.0)]) == ""
