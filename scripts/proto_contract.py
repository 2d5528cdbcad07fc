"""The released wire contract of reid.v1, and the check that a change of reid.proto keeps it.

Clients built from an older reid.proto, in any language, go on working as long as every field
keeps its number, name, type, cardinality and oneof; a field or enum value that goes away leaves
its number reserved; and every RPC keeps its request and response types and its streaming. Nothing
else catches a renumbered field: the stubs regenerate without a word and every test of this
repository, built from the same proto, still passes, while deployed clients read garbage.

``protos/reid/v1/reid.contract.json`` records the contract as released. tests/test_proto_contract.py
fails when reid.proto breaks it, and when reid.proto adds something the record lacks (so that a
later removal of it is caught too). This script records additions and refuses to record a breaking
change: make it compatible (reserve the number of a removed field), or start reid.v2.
Usage: python scripts/proto_contract.py [--write]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "protos" / "reid" / "v1" / "reid.proto"
RECORD = PROTO.with_name("reid.contract.json")


def compile_proto(proto: Path | None = None):
    """``proto`` (default: reid.proto) compiled by protoc (grpcio-tools) into a FileDescriptorProto."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    proto = proto or PROTO

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        code = protoc.main(["protoc", f"-I{proto.parent}", f"--descriptor_set_out={out}", str(proto)])
        if code != 0:
            raise SystemExit(f"protoc failed on {proto} with exit code {code}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return files[-1]


def contract(file) -> dict:
    """What clients depend on in ``file`` (a FileDescriptorProto), as plain JSON-able data."""
    from google.protobuf import descriptor_pb2

    F = descriptor_pb2.FieldDescriptorProto
    types = {number: name.removeprefix("TYPE_").lower() for name, number in F.Type.items()}
    messages, enums = {}, {}

    def reserved(desc) -> list:
        # DescriptorProto's ranges end exclusive, EnumDescriptorProto's inclusive: stored inclusive
        last = 1 if isinstance(desc, descriptor_pb2.DescriptorProto) else 0
        return [[r.start, r.end - last] for r in desc.reserved_range]

    def walk_enum(enum, scope: str) -> None:
        enums[f"{scope}.{enum.name}"] = {"values": {str(v.number): v.name for v in enum.value},
                                        "reserved": reserved(enum)}

    def walk_message(msg, scope: str) -> None:
        name = f"{scope}.{msg.name}"
        fields = {}
        for f in msg.field:
            real_oneof = f.HasField("oneof_index") and not f.proto3_optional
            fields[str(f.number)] = {
                "name": f.name,
                "type": f.type_name.lstrip(".") if f.type_name else types[f.type],
                "repeated": f.label == F.LABEL_REPEATED,
                "oneof": msg.oneof_decl[f.oneof_index].name if real_oneof else None,
            }
        messages[name] = {"fields": fields, "reserved": reserved(msg)}
        for nested in msg.nested_type:
            walk_message(nested, name)
        for enum in msg.enum_type:
            walk_enum(enum, name)

    for msg in file.message_type:
        walk_message(msg, file.package)
    for enum in file.enum_type:
        walk_enum(enum, file.package)
    services = {f"{file.package}.{s.name}": {m.name: {"request": m.input_type.lstrip("."),
                                                       "response": m.output_type.lstrip("."),
                                                       "client_streaming": m.client_streaming,
                                                       "server_streaming": m.server_streaming}
                                              for m in s.method}
                for s in file.service}
    return {"package": file.package, "messages": messages, "enums": enums, "services": services}


def _is_reserved(number: int, ranges: list) -> bool:
    return any(low <= number <= high for low, high in ranges)


def breaks(released: dict, now: dict) -> list[str]:
    """Every way ``now`` breaks clients of ``released``, one line each."""
    found = []
    if now["package"] != released["package"]:
        found.append(f"package {released['package']} is now {now['package']}")
    for name, old in released["messages"].items():
        new = now["messages"].get(name)
        if new is None:
            found.append(f"message {name} was removed")
            continue
        for number, field in old["fields"].items():
            current = new["fields"].get(number)
            if current is None:
                if not _is_reserved(int(number), new["reserved"]):
                    found.append(f"{name}.{field['name']} (= {number}) was removed without reserving {number}")
                continue
            for key in ("name", "type", "repeated", "oneof"):
                if current[key] != field[key]:
                    found.append(f"{name} field {number} changed its {key}: {field[key]!r} -> {current[key]!r}")
    for name, old in released["enums"].items():
        new = now["enums"].get(name)
        if new is None:
            found.append(f"enum {name} was removed")
            continue
        for number, value in old["values"].items():
            current = new["values"].get(number)
            if current is None and not _is_reserved(int(number), new["reserved"]):
                found.append(f"{name}.{value} (= {number}) was removed without reserving {number}")
            elif current is not None and current != value:
                found.append(f"{name} value {number} was renamed: {value} -> {current}")
    for name, methods in released["services"].items():
        new = now["services"].get(name)
        if new is None:
            found.append(f"service {name} was removed")
            continue
        for method, sig in methods.items():
            if method not in new:
                found.append(f"rpc {name}.{method} was removed")
            elif new[method] != sig:
                changed = ", ".join(f"{k} {sig[k]!r} -> {new[method][k]!r}" for k in sig if sig[k] != new[method][k])
                found.append(f"rpc {name}.{method} changed: {changed}")
    return found


def unrecorded(released: dict, now: dict) -> list[str]:
    """What ``now`` has that the record lacks: recorded, a later removal of it is caught."""
    found = [f"message {n}" for n in now["messages"] if n not in released["messages"]]
    found += [f"field {n}.{f['name']} (= {k})" for n, m in now["messages"].items() if n in released["messages"]
              for k, f in m["fields"].items() if k not in released["messages"][n]["fields"]]
    found += [f"enum {n}" for n in now["enums"] if n not in released["enums"]]
    found += [f"enum value {n}.{v} (= {k})" for n, e in now["enums"].items() if n in released["enums"]
              for k, v in e["values"].items() if k not in released["enums"][n]["values"]]
    found += [f"service {n}" for n in now["services"] if n not in released["services"]]
    found += [f"rpc {n}.{m}" for n, s in now["services"].items() if n in released["services"]
              for m in s if m not in released["services"][n]]
    return found


def merged(released: dict, now: dict) -> dict:
    """The record after ``now``'s additions: ``now``, plus the released fields and enum values that
    ``now`` removed and reserved (kept, so that their numbers are never given to something else)."""
    out = json.loads(json.dumps(now))
    for name, old in released["messages"].items():
        for number, field in old["fields"].items():
            out["messages"][name]["fields"].setdefault(number, field)
    for name, old in released["enums"].items():
        for number, value in old["values"].items():
            out["enums"][name]["values"].setdefault(number, value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="Check reid.proto against its released wire contract "
                                     f"({RECORD.relative_to(ROOT)}); --write records its additions.")
    parser.add_argument("--write", action="store_true", help="record what reid.proto adds (refused if it breaks the contract)")
    args = parser.parse_args()
    now = contract(compile_proto())
    released = json.loads(RECORD.read_text()) if RECORD.exists() else None
    problems = breaks(released, now) if released else []
    if problems:
        print("reid.proto breaks the released contract (reserve removed numbers, or start reid.v2):", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    added = unrecorded(released, now) if released else ["everything (no record yet)"]
    if not args.write:
        print(f"compatible; not yet recorded: {', '.join(added)} (run with --write)" if added else "compatible; recorded")
        return 0
    RECORD.write_text(json.dumps(merged(released, now) if released else now, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD.relative_to(ROOT)}" + (f" (added: {', '.join(added)})" if added else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
