"""Backbone constructors (timm architectures, random init; weights come from local files only)."""
from __future__ import annotations

import timm
from torch import nn

from training.models.registry import register_backbone

_SWIN_TIMM_NAMES = {
    "swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224": "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224": "swin_base_patch4_window7_224",
}


def _swin_factory(timm_name: str):
    def build(img_size: tuple[int, int], last_stride: int = 1, overrides: dict | None = None) -> tuple[nn.Module, int]:
        # timm clamps the window to small feature maps, so non-square sizes such as 128x64 work.
        model = timm.create_model(
            timm_name, pretrained=False, num_classes=0, img_size=tuple(img_size), **dict(overrides or {})
        )
        return model, model.num_features

    return build


def swin_override_keys() -> set[str]:
    """The Swin Transformer constructor arguments ``backbone_overrides`` may set. timm drops
    arguments it does not know without a word, so a misspelt key would otherwise be ignored; the
    ones the model builder sets, or that YAML cannot express (layers, devices), are left out."""
    import inspect

    from timm.models.swin_transformer import SwinTransformer

    fixed = {"self", "img_size", "num_classes", "in_chans", "embed_layer", "norm_layer", "device", "dtype"}
    return {name for name, p in inspect.signature(SwinTransformer.__init__).parameters.items()
            if name not in fixed and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


for _name, _timm_name in _SWIN_TIMM_NAMES.items():
    register_backbone(_name)(_swin_factory(_timm_name))


@register_backbone("resnet_50")
def resnet_50(img_size: tuple[int, int], last_stride: int = 1, overrides: dict | None = None) -> tuple[nn.Module, int]:
    """ResNet-50; ``last_stride=1`` keeps the last stage at 1/16 resolution (the ReID strong baseline)."""
    if overrides:
        raise ValueError("resnet_50 takes no backbone overrides")
    model = timm.create_model("resnet50", pretrained=False, num_classes=0)
    block = model.layer4[0]
    block.conv2.stride = (last_stride, last_stride)
    block.downsample[0].stride = (last_stride, last_stride)
    return model, model.num_features


def timm_checkpoint_filter(backbone: nn.Module, state_dict: dict) -> dict:
    """Adapt a timm ImageNet state dict to this backbone's shapes (e.g. Swin's window tables)."""
    module = __import__(type(backbone).__module__, fromlist=["checkpoint_filter_fn"])
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn(state_dict, backbone) if fn else state_dict
