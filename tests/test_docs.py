"""The docs' commands and flags are the real ones: every --flag in README.md and docs/ exists in
some command's parser (or is another tool's, listed below), every command's flag is mentioned in
them, and the training guide's tables list exactly the schema's spec keys."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import typing
from pathlib import Path

import pytest

from export.cli import build_parser as export_parser
from serving.cli import serve_parser
from serving.client_cli import client_parser
from serving.healthcheck import probe_parser
from training.cli import build_parser as reid_parser
from training.config.schema import ExperimentSpec

ROOT = Path(__file__).resolve().parents[1]
# Flags of other programs that the docs show (docker, torchrun, grpcurl, pip, bash).
EXTERNAL = {"--gpus", "--build-arg", "--nproc_per_node", "--standalone", "--no-deps", "--force-reinstall", "--rm", "--stop-timeout",
            "--shm-size", "--ipc", "--cpus", "--basetemp"}


def _parser_flags(parser) -> set[str]:
    flags = set()
    for action in parser._actions:
        flags.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(getattr(action, "choices", None), dict):  # subcommands
            for sub in action.choices.values():
                flags |= _parser_flags(sub)
    return flags


def _commands():
    """Every command a user runs: the installed ones and the health probe."""
    return [("reid", reid_parser()), ("reid-export", export_parser()), ("reid-serve", serve_parser()),
            ("reid-client", client_parser()), ("serving.healthcheck", probe_parser())]


def _script_files() -> list[Path]:
    """The benchmark and maintenance scripts, run by hand."""
    return [f for folder in ("benchmarks", "scripts") for f in sorted((ROOT / folder).glob("*.py"))]


def _script_flags() -> set[str]:
    """Flags of the benchmark and maintenance scripts the docs show."""
    return {flag for f in _script_files() for flag in re.findall(r'"(--[a-z][a-z0-9-]*)"', f.read_text())}


def _doc_texts():
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").glob("*.md"))


def test_every_documented_flag_exists():
    known = set().union(*(_parser_flags(parser) for _, parser in _commands())) | _script_flags()
    missing = {}
    for path in _doc_texts():
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", path.read_text()):
            if flag not in known and flag not in EXTERNAL:
                missing.setdefault(flag, path.name)
    assert not missing, f"documented flags that no command has: {missing}"


def test_every_command_flag_is_documented():
    """The reverse: a flag a user can pass is explained somewhere in the README or a guide."""
    docs = "\n".join(path.read_text() for path in _doc_texts())
    undocumented = {}
    for command, parser in _commands():
        for flag in sorted(_parser_flags(parser) - {"--help"}):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", docs):
                undocumented.setdefault(command, []).append(flag)
    assert not undocumented, f"flags that no guide mentions: {undocumented}"


def _schema_keys(cls, prefix="") -> set[str]:
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= _schema_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.add(prefix + f.name)
    return keys


def test_every_script_answers_help(tmp_path):
    """The benchmarks and scripts are run by hand, so nothing else notices when one rots.
    make_swin_onnx.py and gen_protos.py read their output folder from argv[1]: --help wrote a
    225 MB model, or the gRPC stubs, into a folder named '--help'."""
    import subprocess
    import sys

    scripts = [f for f in _script_files() if '__name__ == "__main__"' in f.read_text()]
    assert len(scripts) >= 10  # all but benchmarks/loadgen.py, the benchmarks' shared module
    runs = {f.name: subprocess.Popen([sys.executable, str(f), "--help"], cwd=tmp_path, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for f in scripts}
    for name, run in runs.items():
        out = run.communicate(timeout=120)[0]
        assert run.returncode == 0 and out.startswith(f"usage: {name}"), f"{name} --help: {out[-2000:]}"
    assert not list(tmp_path.iterdir()), "a script did some work when asked for --help"


def test_training_guide_documents_every_spec_key():
    text = (ROOT / "docs" / "training.md").read_text()
    section, documented = "", set()
    for line in text.splitlines():
        heading = re.match(r"^### `([a-z_.]+)`", line)
        if heading:
            section = heading.group(1) + "."
        elif line.startswith("#"):  # a key table ends at the next heading; later tables hold figures
            section = ""
        cell = re.match(r"^\| ([a-z_, ]+) \|", line)
        if cell and section and cell.group(1).strip() != "key":
            documented |= {section + k.strip() for k in cell.group(1).split(",")}
    keys = {k for k in _schema_keys(ExperimentSpec) if k.split(".")[0] in ("model", "dataset", "train")}
    assert keys - documented == set(), f"spec keys missing from docs/training.md: {sorted(keys - documented)}"
    assert documented - keys == set(), f"docs/training.md documents keys the schema lacks: {sorted(documented - keys)}"


def test_every_command_prints_its_version(capsys):
    for name, parser in _commands():
        if name == "serving.healthcheck":  # a module run with python -m, not an installed command
            continue
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--version"])
        assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"{name} {importlib.metadata.version('reid')}"


def test_every_documented_metric_exists(tiny_onnx, tmp_path):
    """Metric names in the docs (tables, PromQL examples) are those a server exports."""
    from prometheus_client import generate_latest

    from retrieval.gallery import FaissGalleryStore
    from serving.engines.onnxruntime import OnnxRuntimeEngine
    from serving.server import ServerConfig
    from tests.serving_support import ServerThread

    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0))
    thread.server.store = FaissGalleryStore(tmp_path)
    with thread as s:
        s.server.store.create("g", 32)  # so that the gallery family has a sample
        exported = {line.split(" ")[2] for line in generate_latest(s.metrics.registry).decode().splitlines()
                    if line.startswith("# TYPE")}
    families = exported | {f"{name}_{part}" for name in exported for part in ("bucket", "sum", "count")}
    documented = {m for path in _doc_texts() for m in re.findall(r"\breid_[a-z_]+", path.read_text())} - {"reid_pb"}
    assert documented and documented <= families, f"documented metrics no server exports: {documented - families}"

