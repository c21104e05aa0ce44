"""The method registry: every compression method is one module here that registers itself.

As timm's model registry: importing this package imports every method module, each decorated
with @register; `convert`, `plan` and the command line read the registry, so adding a method is
one new module (and its tests).

A composition such as `toast+tome` runs structured parts first and the token part last, on the
graph the earlier parts produced. One token reducer per graph: ToMe and AS-ViT each keep their
own token sizes and cannot share them, and CAIT's ATME gives way to a ToMe or AS-ViT part (CAIT
then contributes its channel pruning).
"""
from __future__ import annotations

from ...errors import Vit2TrtError
from .base import Method, Run, option, option_fields

REGISTRY: dict[str, Method] = {}


def register(cls: type) -> type:
    REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise Vit2TrtError(f"unknown method '{name}'; available: {', '.join(available())} "
                           "(or a composition such as toast+tome).")
    return REGISTRY[name]


def available() -> list[str]:
    return [m.name for m in sorted(REGISTRY.values(), key=lambda m: m.order)]


def parse_composition(text: str) -> list[Method]:
    """'tome+toast' -> [toast, tome]: known, distinct, in the order they must run, compatible."""
    names = [n.strip() for n in str(text).split("+")]
    if not all(names):
        raise Vit2TrtError(f"--method '{text}' has an empty part; write methods joined by '+', e.g. toast+tome.")
    parts = [get_method(n) for n in names]
    if len(set(names)) != len(names):
        raise Vit2TrtError(f"--method '{text}' names a method twice.")
    reducers = [m.name for m in parts if m.reduces_tokens]
    if len(reducers) > 1:
        raise Vit2TrtError(f"--method '{text}' combines two token reducers ({' and '.join(reducers)}); each keeps "
                           "its own token sizes for attention and they cannot share them. Keep one.")
    return sorted(parts, key=lambda m: m.order)


def composition_name(parts: list[Method]) -> str:
    return "+".join(m.name for m in parts)


from . import asvit, cait, toast, tome  # noqa: E402,F401 - registration

__all__ = ["Method", "Run", "option", "option_fields", "register", "get_method", "available",
           "parse_composition", "composition_name", "REGISTRY"]
