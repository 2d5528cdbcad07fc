"""ReID models: a backbone from the registry plus the BNNeck head, normalization baked in."""
from training.models.build import ModelArgs, build_model, model_args_from_spec
from training.models.registry import available_backbones

__all__ = ["ModelArgs", "available_backbones", "build_model", "model_args_from_spec"]
