"""Our proto/ contract matches E2B's envd contract, as shipped in the `e2b` SDK's descriptors.

Both sides' generated modules embed a serialised FileDescriptorProto in a `file_desc(b"...")`
call; we read it from the source (no import, so no clash of runtimes), decode it with Google's
protobuf (brought by grpcio-tools) and compare messages, fields, enums and services.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from tests.conftest import ROOT
from tests.integration.upstream_venv import site_packages, upstream_venv

pytestmark = pytest.mark.sdk

OURS = ROOT / "src" / "nestbox" / "protocol" / "gen"
FILES = ["process/process_pb.py", "filesystem/filesystem_pb.py"]


def load_descriptor(path: Path) -> descriptor_pb2.FileDescriptorProto:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "file_desc":
            arg = node.args[0]
            assert isinstance(arg, ast.Constant)
            return descriptor_pb2.FileDescriptorProto.FromString(arg.value)
    raise AssertionError(f"no file_desc(...) in {path}")


def shape(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
    """Everything the wire depends on; options such as java_package are left out."""

    def message(m: descriptor_pb2.DescriptorProto) -> dict[str, Any]:
        oneofs = [o.name for o in m.oneof_decl]
        return {
            "fields": {
                f.name: (
                    f.number,
                    f.type,
                    f.label,
                    f.type_name,
                    f.json_name,
                    oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
                    f.proto3_optional,
                )
                for f in m.field
            },
            "nested": {n.name: message(n) for n in m.nested_type},
            "enums": {e.name: [(v.name, v.number) for v in e.value] for e in m.enum_type},
            "map_entry": m.options.map_entry,
        }

    return {
        "package": fd.package,
        "dependencies": sorted(fd.dependency),
        "messages": {m.name: message(m) for m in fd.message_type},
        "enums": {e.name: [(v.name, v.number) for v in e.value] for e in fd.enum_type},
        "services": {
            s.name: {
                m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                for m in s.method
            }
            for s in fd.service
        },
    }


@pytest.fixture(scope="module")
def e2b_envd() -> Path:
    return site_packages(upstream_venv("e2b", "2.63.0")) / "e2b" / "envd"


@pytest.mark.parametrize("name", FILES)
def test_our_contract_matches_e2b(name: str, e2b_envd: Path) -> None:
    ours = shape(load_descriptor(OURS / name))
    theirs = shape(load_descriptor(e2b_envd / name))
    assert ours == theirs


def test_a_changed_field_number_is_caught(e2b_envd: Path) -> None:
    """The comparison is not vacuous: renumbering one field makes the shapes differ."""
    fd = load_descriptor(OURS / FILES[0])
    fd.message_type[0].nested_type[0].field[0].number = 7
    assert shape(fd) != shape(load_descriptor(e2b_envd / FILES[0]))
