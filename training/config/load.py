"""Load a YAML spec, apply ``key.sub=value`` overrides and validate it against the schema.

Unknown keys, wrong types and out-of-range values fail at once with a ``ConfigError`` naming the
key. Keys that do nothing under the spec's other settings are named (``_CONDITIONAL``): a backbone
key changed for another backbone fails, at its default (the TAO example spec sets them) it is
warned about; an optimizer or loss key changed where its setting is off is warned about.
"""
from __future__ import annotations

import dataclasses
import logging
import typing
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from serving.engines.base import pixel_scale_problem, warn_if_wide
from serving.strict_yaml import YamlFileError, load_yaml, load_yaml_file, yaml_problem
from training.config.schema import ExperimentSpec
from training.errors import ConfigError

log = logging.getLogger(__name__)


def _without_backbone(backbones: tuple[str, ...], why: str) -> Callable[[ExperimentSpec], str | None]:
    return lambda s: None if s.model.backbone in backbones else f"with backbone {s.model.backbone}: {why}"


def _without_margin(s: ExperimentSpec) -> str | None:
    if s.dataset.sampler not in ("triplet", "softmax_triplet") or s.model.metric_loss_type not in ("triplet", "triplet_center"):
        return (f"with dataset.sampler={s.dataset.sampler} and model.metric_loss_type={s.model.metric_loss_type}: "
                "no triplet loss is trained")
    return "with model.no_margin=True: the soft-margin triplet loss has no margin" if s.model.no_margin else None


def _without_center(s: ExperimentSpec) -> str | None:
    return None if s.model.with_center_loss else "with model.with_center_loss=False: no center loss is trained"


# Keys that only some settings use: key -> (what says, for a spec, why the key does nothing there
# ("with SETTING: reason"), or None where it applies; whether a changed value fails).
# Backbone keys fail when changed (set at their default, as the TAO example spec sets them, they are
# only warned about). Optimizer and loss keys belong to settings a user toggles (model.no_margin,
# the optimizer, center loss), so a changed value there is warned about, not refused.
_CONDITIONAL: dict[str, tuple[Callable[[ExperimentSpec], str | None], bool]] = {
    "model.last_stride": (_without_backbone(("resnet_50",), "it sets the stride of ResNet-50's last stage"), True),
    "model.stride_size": (_without_backbone((), "it applies to ViT-style overlapping patch embeddings, which no "
                                                 "supported backbone has"), True),
    "model.pretrain_hw_ratio": (_without_backbone((), "it applies to ViT-style position-embedding resizing, which no "
                                                       "supported backbone has"), True),
    "train.optim.momentum": (lambda s: None if s.train.optim.name == "SGD" else
                             f"with train.optim.name={s.train.optim.name}: it is SGD's momentum", False),
    "train.optim.triplet_loss_margin": (_without_margin, False),
    "train.optim.center_loss_weight": (_without_center, False),
    "train.optim.center_lr": (_without_center, False),
}


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", parsed value); the value is parsed as YAML (``[0,1]``, ``True``, ``1e-3``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {yaml_problem(exc)}") from None
    return key.strip(), value


def _set_path(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _check_number(key: str, value: float, rng: tuple) -> None:
    lo, hi, lo_open = rng
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{key}={value} is out of range: must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value} is out of range: must be <= {hi}")


def _coerce_scalar(key: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if typ is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    raise TypeError(f"unsupported schema type {typ} for {key}")


def _build(cls: type, data: Any, prefix: str, explicit: set[str]):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'spec'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ConfigError(f"unknown key {names}; valid keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        typ, meta = hints[name], fields[name].metadata
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value if value is not None else {}, key + ".", explicit)
            continue
        explicit.add(key)
        if typing.get_origin(typ) is list:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key} must be a list, got {value!r}")
            item_type = typing.get_args(typ)[0]
            items = [_coerce_scalar(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
            if meta.get("length") is not None and len(items) != meta["length"]:
                raise ConfigError(f"{key} must have {meta['length']} items, got {len(items)}")
            for i, item in enumerate(items):
                _check_number(f"{key}[{i}]", item, meta["item_range"])
            kwargs[name] = items
            continue
        value = _coerce_scalar(key, value, typ)
        if "choices" in meta and value not in meta["choices"]:
            options = ", ".join(repr(c) for c in meta["choices"])
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {options}")
        if "range" in meta:
            _check_number(key, value, meta["range"])
        kwargs[name] = value
    return cls(**kwargs)


def spec_value(spec: ExperimentSpec, key: str) -> Any:
    """The value of ``section.key`` in ``spec``."""
    node: Any = spec
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _check_combinations(spec: ExperimentSpec, explicit: set[str]) -> None:
    defaults = ExperimentSpec()
    for key, (inapplicable, strict) in _CONDITIONAL.items():
        why = inapplicable(spec) if key in explicit else None
        if why is None:
            continue
        changed = spec_value(spec, key) != spec_value(defaults, key)
        if changed and strict:  # set to change something it cannot change
            raise ConfigError(f"{key}={spec_value(spec, key)} cannot apply {why}; remove it")
        if changed or strict:
            log.warning("%s=%s has no effect %s; ignored", key, spec_value(spec, key), why)
    m, d, o = spec.model, spec.dataset, spec.train.optim
    problem = pixel_scale_problem(d.pixel_mean, d.pixel_std)
    if problem:
        raise ConfigError(f"dataset.pixel_mean={d.pixel_mean} / dataset.pixel_std={d.pixel_std} {problem}")
    if {"model.input_height", "model.input_width"} & explicit:
        warn_if_wide(m.input_height, m.input_width, f"model.input_height={m.input_height}, model.input_width={m.input_width}")
    uses_center = m.metric_loss_type in ("center", "triplet_center")
    if m.with_center_loss != uses_center:
        raise ConfigError(
            f"model.with_center_loss={m.with_center_loss} contradicts model.metric_loss_type={m.metric_loss_type!r}: "
            "center loss needs with_center_loss=True and metric_loss_type center or triplet_center"
        )
    if d.sampler != "softmax" and d.batch_size % d.num_instances:
        raise ConfigError(
            f"dataset.batch_size={d.batch_size} must be a multiple of dataset.num_instances={d.num_instances} "
            f"for sampler {d.sampler!r}"
        )
    if sorted(o.lr_steps) != o.lr_steps:
        raise ConfigError(f"train.optim.lr_steps={o.lr_steps} must be increasing")
    if m.pretrain_choice and not m.pretrained_model_path:
        raise ConfigError(
            f"model.pretrain_choice={m.pretrain_choice!r} needs model.pretrained_model_path (a local file; "
            "nothing is downloaded); set pretrain_choice to \"\" to train from scratch"
        )
    if m.backbone_overrides and not m.backbone.startswith("swin"):
        raise ConfigError("model.backbone_overrides applies to Swin backbones only")
    if m.backbone_overrides:
        from training.models.backbones import swin_override_keys

        allowed = swin_override_keys()
        unknown = sorted(set(m.backbone_overrides) - allowed)
        if unknown:
            raise ConfigError(f"model.backbone_overrides: {', '.join(unknown)} is not a Swin Transformer argument; "
                              f"choose from {', '.join(sorted(allowed))}")
    if "encryption_key" in explicit and spec.encryption_key:
        log.warning("encryption_key is ignored: checkpoints are written as plain, unencrypted files")


def build_spec(data: dict | None, overrides: Iterable[str] = ()) -> ExperimentSpec:
    """Validate a spec tree (as loaded from YAML) with overrides applied on top."""
    tree = dict(data or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    explicit: set[str] = set()
    spec = _build(ExperimentSpec, tree, "", explicit)
    _check_combinations(spec, explicit)
    spec.given_keys = frozenset(explicit)  # type: ignore[misc]  # per instance; see ExperimentSpec
    return spec


def load_spec(path: str | Path | None, overrides: Iterable[str] = ()) -> ExperimentSpec:
    """Read a YAML spec file (or none: schema defaults) and apply ``key.sub=value`` overrides."""
    data = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"spec file {path} is a folder; give the YAML file")
        if not path.is_file():
            raise ConfigError(f"spec file {path} does not exist")
        try:
            data = load_yaml_file(path) or {}
        except YamlFileError as exc:
            raise ConfigError(f"spec file {path} {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"spec file {path} holds a {type(data).__name__}; a spec is a mapping of sections "
                              "(model:, dataset:, train:, ...)")
    return build_spec(data, overrides)


def spec_to_dict(spec: ExperimentSpec) -> dict:
    """Plain nested dict (for checkpoints and logs)."""
    return dataclasses.asdict(spec)
