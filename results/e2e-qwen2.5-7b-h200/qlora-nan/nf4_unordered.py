"""The regression test with the fix switched off: it must fail (the quantization races the side stream)."""
import contextlib, sys
sys.path.insert(0, "tests")
import falqon_core.methods.qlora_nf4 as q
import test_methods_baselines as t
q.bitsandbytes_quantize_ordered = lambda device: contextlib.nullcontext()
fails = 0
for i in range(3):
    try:
        t.test_nf4_conversion_on_a_side_stream_quantizes_the_finished_weight()
        print("round", i, "passed (race not caught)")
    except AssertionError as e:
        fails += 1
        print("round", i, "failed as expected:", str(e).splitlines()[0][:120])
print("without the fix: failed", fails, "of 3")
