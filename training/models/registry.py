"""One registry of backbones: name -> constructor returning (feature extractor, output width).

A constructor takes the input size and plain keyword arguments, so tests and export build models
without a spec file. Every backbone maps an N x 3 x H x W batch to N x width pooled features.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

BackboneFactory = Callable[..., "tuple[nn.Module, int]"]
_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    def wrap(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def create_backbone(name: str, **kwargs) -> tuple[nn.Module, int]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    return _REGISTRY[name](**kwargs)


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)
