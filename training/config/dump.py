"""A spec written back as YAML, for ``reid spec``: every key, the ones the file or the overrides
set as they are, the others commented out at their defaults.

Commented defaults keep the spec's meaning when the output is loaded again: a key left at its
default is not the same answer as a key set to the default's value (a model without metadata
takes its normalization only from keys the user set; see ``ExperimentSpec.given_keys``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from training.config.schema import ExperimentSpec

HEADER = ("# reid spec: every key; those the spec file or the overrides set are active, the others are\n"
          "# commented out at their defaults. Loaded again (reid train -e FILE), it is the same spec.\n")


def _value(value: Any) -> str:
    """``value`` as one line of YAML flow style (``[0.5, 0.5]``, ``''``, ``{embed_dim: 32}``)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def _lines(node: Any, prefix: str, indent: str, given: frozenset[str]) -> list[str]:
    out = []
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.append(f"{indent}{f.name}:")
            out += _lines(value, key + ".", indent + "  ", given)
            continue
        doc = f.metadata.get("doc", "")
        line = f"{indent}{'' if key in given else '# '}{f.name}: {_value(value)}"
        out.append(f"{line}  # {doc}" if doc else line)
    return out


def spec_yaml(spec: ExperimentSpec) -> str:
    return HEADER + "\n".join(_lines(spec, "", "", spec.given_keys)) + "\n"
