"""The committed stubs are what `make proto` would generate from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "common" / "taskfleet" / "v1"


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    # Given the .proto files, when they are compiled exactly as `make proto` does
    bin_dir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "protos"),
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            *protos,
        ],
        check=True,
        capture_output=True,
    )
    # then every generated file equals the committed one
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "taskfleet" / "v1").iterdir()}
    committed = {
        p.name: p.read_bytes()
        for p in GENERATED.iterdir()
        if p.name != "__init__.py" and p.is_file()
    }
    assert sorted(fresh) == sorted(committed), "run `make proto` and commit the stubs"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit them"
