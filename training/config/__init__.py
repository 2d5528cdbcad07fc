"""Typed experiment spec: schema, YAML loading and ``key.sub=value`` overrides."""
from training.config.load import load_spec, spec_to_dict
from training.config.schema import ExperimentSpec

__all__ = ["ExperimentSpec", "load_spec", "spec_to_dict"]
