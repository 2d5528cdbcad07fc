"""YAML for the files people edit by hand (training specs, ``reid-serve --config``), read safely
and strictly, with one-line errors.

Strict about one thing PyYAML allows: a key written twice in one mapping. PyYAML keeps the
later value without a word, so a spec that gains a second ``train:`` section at its end (a
common way to adapt a copied spec) silently loses every key of the first one and trains with
defaults. Keys repeated through a merge (``<<: *base`` then an override) are meant and stay
allowed. Training imports this from here because serving may not import training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first_seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader's own check below says so
                continue
            if earlier is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"key {key!r} appears twice in one mapping (first on line {earlier.line + 1}); "
                    "YAML would keep only the later value: merge the two",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """Like ``yaml.safe_load``, but a key written twice in one mapping is a ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


class YamlFileError(ValueError):
    """A YAML file that cannot be read as YAML; the message completes "FILE ..." (the caller names
    the file as its users know it: a spec file, ``--config``)."""


def load_yaml_file(path: Path) -> Any:
    """``load_yaml`` of a file, read as UTF-8 (YAML's encoding) whatever the locale: under
    ``LC_ALL=POSIX`` Python reads files as ASCII, and a non-ASCII path or comment ended in a
    UnicodeDecodeError traceback. OSError (a missing or unreadable file) is left to the caller."""
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise YamlFileError(f"is not valid YAML: {yaml_problem(exc)}") from None
    except UnicodeDecodeError as exc:
        raise YamlFileError(f"is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message spans several lines (context, a quoted snippet, a caret); errors here are
    one line, so keep where and what."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + (getattr(exc, "problem", None) or str(exc).splitlines()[0])
