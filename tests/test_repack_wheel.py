"""scripts/repack_wheel_without.py: the repacked wheel lacks the dropped folders, keeps every other member byte for
byte, and its RECORD lists exactly its members with hashes that match (what pip checks when it installs)."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("repack_wheel_without", ROOT / "scripts/repack_wheel_without.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_wheel(path: Path, repack) -> dict[str, bytes]:
    members = {
        "pkg/__init__.py": b"x = 1\n",
        "pkg/kernels.py": b"y = 2\n",
        "studio/app.js": b"console.log(1)\n" * 100,
        "studio/assets/icon.png": bytes(range(256)),
        "pkg-1.0.dist-info/top_level.txt": b"pkg\nstudio\n",
        "pkg-1.0.dist-info/METADATA": b"Name: pkg\nVersion: 1.0\n",
    }
    record = "".join(f"{n},{repack.record_hash(d)},{len(d)}\n" for n, d in members.items()) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr("pkg-1.0.dist-info/RECORD", record)
    return members


def test_repacked_wheel_drops_the_folder_and_its_record_matches_its_members(tmp_path):
    repack = load_script()
    members = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", repack)
    out = repack.repack_without(tmp_path / "pkg-1.0-py3-none-any.whl", ["studio"], tmp_path / "out")

    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert not any(n.startswith("studio/") for n in names)
        for name in ("pkg/__init__.py", "pkg/kernels.py", "pkg-1.0.dist-info/METADATA"):
            assert z.read(name) == members[name]
        assert z.read("pkg-1.0.dist-info/top_level.txt") == b"pkg\n"
        record = [line.split(",") for line in z.read("pkg-1.0.dist-info/RECORD").decode().splitlines()]
        assert {path for path, _, _ in record} == names
        for path, digest, size in record:
            if path.endswith("RECORD"):
                continue
            data = z.read(path)
            assert (digest, int(size)) == (repack.record_hash(data), len(data)), path


def test_a_file_that_is_not_a_wheel_exits_2(tmp_path, capsys):
    (tmp_path / "not.whl").write_text("text")
    assert load_script().main([str(tmp_path / "not.whl"), "studio", "--out", str(tmp_path / "out")]) == 2
    assert "is not a wheel" in capsys.readouterr().err
