"""reid.proto against its recorded wire contract (scripts/proto_contract.py): deployed clients, in
any language, are built from the released proto, and only this check sees a change that breaks them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import proto_contract as pc  # noqa: E402

SOURCE = pc.PROTO.read_text()


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(pc.RECORD.read_text())


def _edited(tmp_path: Path, old: str, new: str) -> Path:
    assert SOURCE.count(old) == 1, old
    path = tmp_path / "reid.proto"
    path.write_text(SOURCE.replace(old, new))
    return path


def test_reid_proto_keeps_and_records_its_contract(recorded):
    now = pc.contract(pc.compile_proto())
    assert pc.breaks(recorded, now) == []
    assert pc.unrecorded(recorded, now) == [], "record the additions: python scripts/proto_contract.py --write"


@pytest.mark.parametrize("old, new, expected", [
    ("message DropGalleryRequest { string name = 1; }", "message DropGalleryRequest { string name = 2; }",
     "reid.v1.DropGalleryRequest.name (= 1) was removed without reserving 1"),
    ("message GetGalleryInfoRequest { string name = 1; }", "message GetGalleryInfoRequest { bytes name = 1; }",
     "reid.v1.GetGalleryInfoRequest field 1 changed its type: 'string' -> 'bytes'"),
    ("message DropGalleryRequest { string name = 1; }", "message DropGalleryRequest { string gallery = 1; }",
     "reid.v1.DropGalleryRequest field 1 changed its name: 'name' -> 'gallery'"),
    ("message ListGalleriesResponse { repeated GalleryInfo galleries = 1; }",
     "message ListGalleriesResponse { GalleryInfo galleries = 1; }",
     "reid.v1.ListGalleriesResponse field 1 changed its repeated: True -> False"),
    ("message DropGalleryRequest { string name = 1; }", "message DropGalleryRequest { oneof of { string name = 1; } }",
     "reid.v1.DropGalleryRequest field 1 changed its oneof: None -> 'of'"),
    ("  FLAT = 1;", "  EXACT = 1;", "reid.v1.IndexType value 1 was renamed: FLAT -> EXACT"),
    ("  HNSW = 2;                    // approximate graph search, for large galleries\n", "",
     "reid.v1.IndexType.HNSW (= 2) was removed without reserving 2"),
    ("  rpc Search(SearchRequest) returns (SearchResponse);\n", "", "rpc reid.v1.ReIdentification.Search was removed"),
    ("rpc EmbedStream(stream EmbedRequest)", "rpc EmbedStream(EmbedRequest)",
     "rpc reid.v1.ReIdentification.EmbedStream changed: client_streaming True -> False"),
    ("rpc GetGalleryInfo(GetGalleryInfoRequest) returns (GalleryInfo)",
     "rpc GetGalleryInfo(DropGalleryRequest) returns (GalleryInfo)",
     "rpc reid.v1.ReIdentification.GetGalleryInfo changed: request 'reid.v1.GetGalleryInfoRequest' -> "
     "'reid.v1.DropGalleryRequest'"),
])
def test_each_kind_of_breaking_change_is_named(tmp_path, recorded, old, new, expected):
    assert pc.breaks(recorded, pc.contract(pc.compile_proto(_edited(tmp_path, old, new)))) == [expected]


def test_a_removal_that_reserves_its_number_and_an_addition_keep_the_contract(tmp_path, recorded):
    proto = _edited(tmp_path, "message DropGalleryRequest { string name = 1; }",
                    "message DropGalleryRequest { reserved 1; string gallery_name = 2; }")
    now = pc.contract(pc.compile_proto(proto))
    assert pc.breaks(recorded, now) == []
    assert pc.unrecorded(recorded, now) == ["field reid.v1.DropGalleryRequest.gallery_name (= 2)"]


def test_write_records_additions_keeps_removed_numbers_and_refuses_a_break(tmp_path, monkeypatch, capsys, recorded):
    record = tmp_path / "reid.contract.json"
    record.write_text(pc.RECORD.read_text())
    monkeypatch.setattr(pc, "RECORD", record)
    monkeypatch.setattr(pc, "ROOT", tmp_path)
    monkeypatch.setattr(pc, "PROTO", _edited(tmp_path, "message DropGalleryRequest { string name = 1; }",
                                             "message DropGalleryRequest { reserved 1; string gallery_name = 2; }"))
    monkeypatch.setattr(sys, "argv", ["proto_contract.py", "--write"])
    assert pc.main() == 0
    fields = json.loads(record.read_text())["messages"]["reid.v1.DropGalleryRequest"]["fields"]
    assert {k: f["name"] for k, f in fields.items()} == {"1": "name", "2": "gallery_name"}  # 1 stays taken
    # reusing the reserved number for something else is a break, and nothing is written
    before = record.read_text()
    pc.PROTO.write_text(SOURCE.replace("message DropGalleryRequest { string name = 1; }",
                                       "message DropGalleryRequest { int64 name = 1; string gallery_name = 2; }"))
    assert pc.main() == 1
    assert "reid.v1.DropGalleryRequest field 1 changed its type: 'string' -> 'int64'" in capsys.readouterr().err
    assert record.read_text() == before
