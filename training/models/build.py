"""Build a ReID model from plain arguments; ``model_args_from_spec`` maps the spec onto them.

The arguments are stored in every checkpoint, so evaluation and export rebuild the exact model
without the spec file.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from training.checkpoint import load_weights
from training.errors import ConfigError
from training.models import backbones  # noqa: F401  (registers the backbones)
from training.models.backbones import timm_checkpoint_filter
from training.models.head import ReIdHead
from training.models.registry import create_backbone

log = logging.getLogger(__name__)


@dataclass
class ModelArgs:
    backbone: str
    num_classes: int
    input_height: int = 256
    input_width: int = 128
    feat_dim: int = 768
    neck: str = "bnneck"
    neck_feat: str = "after"
    last_stride: int = 1
    with_flip_feature: bool = False
    pixel_mean: tuple = (0.5, 0.5, 0.5)
    pixel_std: tuple = (0.5, 0.5, 0.5)
    backbone_overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pixel_mean"], d["pixel_std"] = list(self.pixel_mean), list(self.pixel_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        return cls(**{**d, "pixel_mean": tuple(d["pixel_mean"]), "pixel_std": tuple(d["pixel_std"])})


class ReIdModel(nn.Module):
    """Input: N x 3 x H x W RGB in 0..1. Normalization happens here, once, for every caller."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.backbone, width = create_backbone(
            args.backbone,
            img_size=(args.input_height, args.input_width),
            last_stride=args.last_stride,
            overrides=args.backbone_overrides,
        )
        self.head = ReIdHead(width, args.feat_dim, args.num_classes, args.neck, args.neck_feat)
        self.register_buffer("pixel_mean", torch.tensor(args.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(args.pixel_std, dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def embedding_dim(self) -> int:
        return self.args.feat_dim

    def _forward(self, images: torch.Tensor):
        return self.head(self.backbone((images - self.pixel_mean) / self.pixel_std))

    def forward(self, images: torch.Tensor):
        if self.training or not self.args.with_flip_feature:
            return self._forward(images)
        return (self._forward(images) + self._forward(images.flip(3))) / 2


def build_model(args: ModelArgs) -> ReIdModel:
    return ReIdModel(args)


def model_args_from_spec(spec, num_classes: int | None = None) -> ModelArgs:
    """The spec's model/dataset keys as ``ModelArgs`` (``num_classes`` defaults to the spec's)."""
    m, d = spec.model, spec.dataset
    return ModelArgs(
        backbone=m.backbone,
        num_classes=num_classes or d.num_classes,
        input_height=m.input_height,
        input_width=m.input_width,
        feat_dim=m.feat_dim,
        neck=m.neck,
        neck_feat=m.neck_feat,
        last_stride=m.last_stride,
        with_flip_feature=m.with_flip_feature,
        pixel_mean=tuple(d.pixel_mean),
        pixel_std=tuple(d.pixel_std),
        backbone_overrides=dict(m.backbone_overrides),
    )


_DATASET_FIELDS = ("num_classes", "pixel_mean", "pixel_std")


def spec_key(field_name: str) -> str:
    """The spec key ``model_args_from_spec`` fills a ``ModelArgs`` field from, for messages."""
    return f"{'dataset' if field_name in _DATASET_FIELDS else 'model'}.{field_name}"


def model_args_differences(saved: dict, now: ModelArgs) -> list[str]:
    """``key=saved (now value)`` for every field of a checkpoint's model arguments that ``now``
    does not share: what a user must set back to resume the run."""
    current = now.to_dict()
    return [f"{spec_key(name)}={saved.get(name)!r} (now {value!r})"
            for name, value in current.items() if saved.get(name) != value]


def _extract_state_dict(obj, path: str) -> dict:
    if isinstance(obj, dict):
        for key in ("model_state", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        return obj
    raise ConfigError(f"model.pretrained_model_path {path} holds a {type(obj).__name__}, not a state dict")


def load_pretrained(model: ReIdModel, path: str, choice: str) -> list[str]:
    """Load local weights: ``imagenet`` into the backbone (timm layout), ``self`` into the whole model.

    Keys whose shapes differ (e.g. a classifier for another number of identities) or that the model
    lacks are skipped and logged. Returns the skipped keys. Pickles are never executed
    (``weights_only=True``).
    """
    state = _extract_state_dict(load_weights(path, "model.pretrained_model_path"), path)
    target: nn.Module = model.backbone if choice == "imagenet" else model
    if choice == "imagenet":
        state = timm_checkpoint_filter(model.backbone, state)
    own = target.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    missing = sorted(set(own) - set(usable))
    target.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s (%s)", len(usable), path, choice)
    if skipped:
        log.warning("skipped %d keys from %s (shape mismatch or unknown): %s", len(skipped), path, ", ".join(skipped))
    if missing:
        log.info("%d model keys keep their initial values: %s", len(missing), ", ".join(missing[:20]))
    if not usable:
        raise ConfigError(f"model.pretrained_model_path {path} shares no tensor with backbone {model.args.backbone} "
                          f"(model.pretrain_choice={choice})")
    return skipped
