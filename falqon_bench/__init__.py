"""falqon_bench: the suite that sweeps methods x shapes x ranks x tokens, times them on the GPU, and reports."""

__version__ = "0.1.0"
