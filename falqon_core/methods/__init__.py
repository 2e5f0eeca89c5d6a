"""Method registry: name -> Method. Adding a method is adding one module in this folder.

Every module here is imported on first use; a module registers its class with @register_method.
"""

from __future__ import annotations

import importlib
import pkgutil

from falqon_core.methods.base import AdapterConfig, Method, MethodUnavailable

__all__ = [
    "AdapterConfig",
    "Method",
    "MethodUnavailable",
    "UnknownMethodError",
    "check_method_options",
    "get_method",
    "method_names",
    "register_method",
]

_REGISTRY: dict[str, type[Method]] = {}
_DISCOVERED = False


class UnknownMethodError(KeyError):
    """A method name that no module registered; the message lists the allowed names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} must set a non-empty `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice ({_REGISTRY[cls.name].__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def method_names() -> list[str]:
    """All registered method names, in a stable order (the reference bf16 methods first)."""
    _discover()
    order = ["bf16_linear", "bf16_lora", "qlora_nf4", "fp8_lora", "fp8_base_lora", "fp6_lora", "halo_lora", "falqon"]
    known = [n for n in order if n in _REGISTRY]
    return known + sorted(set(_REGISTRY) - set(known))


def get_method(name: str) -> Method:
    """A fresh instance of the method registered as `name`."""
    _discover()
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; allowed: {', '.join(method_names())}")
    return _REGISTRY[name]()


def check_method_options(name: str, options: dict) -> None:
    """ValueError when `options` names a key method `name` does not read (its class's `option_names`), or holds
    a value its `parse_options` refuses."""
    _discover()
    allowed = _REGISTRY[name].option_names if name in _REGISTRY else None
    unknown = sorted(set(options) - set(allowed)) if allowed is not None else []
    if unknown:
        takes = f"allowed: {', '.join(allowed)}" if allowed else "it takes no options"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} of method {name}; {takes}")
    parse = _REGISTRY[name].parse_options if name in _REGISTRY else None
    if parse is not None:
        parse(options)
