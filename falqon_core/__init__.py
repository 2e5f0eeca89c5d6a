"""falqon_core: FP8 LoRA fine-tuning methods (baselines and FALQON) as drop-in layer converters.

Importable without the benchmark suite: `from falqon_core.methods import get_method`.
"""

__version__ = "0.1.0"
