"""Generate the Python gRPC stubs for protos/ into serving/proto/ with package-relative imports.

protoc writes ``from reid.v1 import reid_pb2`` into the service stub, which only works when
``reid`` is a top-level package; the stubs live inside ``serving.proto``, so that import is
rewritten to a relative one. tests/test_serving.py fails when the committed stubs are stale; it
compares with the output of the grpcio-tools version pinned in pyproject.toml (dev extra), whose
version is stamped into the stubs, so bump that pin and regenerate together.
Usage: python scripts/gen_protos.py [OUT_DIR]
"""
from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = "reid/v1/reid.proto"


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                            f"--grpc_python_out={tmp}", str(ROOT / "protos" / PROTO)])
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "reid" / "v1").iterdir()):
            text = src.read_text()
            text = re.sub(r"^from reid\.v1 import reid_pb2 as", "from . import reid_pb2 as", text, flags=re.M)
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate the gRPC stubs for protos/ with package-relative imports.")
    parser.add_argument("out_dir", nargs="?", type=Path, default=ROOT / "serving" / "proto",
                        help="where to write them (default: serving/proto, where the package imports them from)")
    for path in generate(parser.parse_args().out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
