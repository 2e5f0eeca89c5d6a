"""Repack a wheel without the top-level folders a run never loads, with its RECORD and top_level.txt updated.

    python scripts/repack_wheel_without.py WHEEL FOLDER [FOLDER ...] --out DIR

Why: the GPU machine gets its missing packages as wheels carried with the working tree (64 MB in all), and
unsloth 2026.10.9's wheel is 29 MB, 26 MB of it its Studio GUI (`studio/`), which Unsloth's training path
never imports (it reads Studio's files lazily, by path, only for its Decision models). The wheels of
`.whlunsloth/` (see scripts/gpu/fast_stacks_e2e.sh) were made with

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d DL \\
        unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 multiprocess==0.70.19 dill==0.4.1
    python scripts/repack_wheel_without.py DL/unsloth-2026.10.9-py3-none-any.whl studio --out .whlunsloth

Every other member is copied unchanged (same name, date and bytes); RECORD loses the dropped files' lines and
gets top_level.txt's new hash and size. The output keeps the input's file name.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import zipfile
from pathlib import Path


def record_hash(data: bytes) -> str:
    """RECORD's hash field: sha256, urlsafe base64 without padding (PEP 376 / the wheel spec)."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack_without(wheel: Path, folders: list[str], out_dir: Path) -> Path:
    """Write out_dir/<wheel's name> without the members under `folders`; returns its path."""
    dropped = tuple(f"{folder.strip('/')}/" for folder in folders)
    out = Path(out_dir) / wheel.name
    if out.resolve() == wheel.resolve():
        raise ValueError(f"--out must be another directory than the wheel's own ({wheel.parent})")
    with zipfile.ZipFile(wheel) as source:
        names = source.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        top_level_name = record.replace("RECORD", "top_level.txt")
        top_level = None
        if top_level_name in names:
            kept = [line for line in source.read(top_level_name).decode().splitlines() if f"{line.strip()}/" not in dropped]
            top_level = "".join(f"{line}\n" for line in kept).encode()
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
            for info in source.infolist():
                if info.filename.startswith(dropped):
                    continue
                data = source.read(info.filename)
                if info.filename == top_level_name and top_level is not None:
                    data = top_level
                elif info.filename == record:
                    lines = []
                    for line in data.decode().splitlines():
                        path = line.split(",")[0]
                        if path.startswith(dropped):
                            continue
                        if path == top_level_name and top_level is not None:
                            line = f"{path},{record_hash(top_level)},{len(top_level)}"
                        lines.append(line)
                    data = ("\n".join(lines) + "\n").encode()
                target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("folders", nargs="+", help="top-level folders of the wheel to leave out, e.g. studio")
    parser.add_argument("--out", type=Path, required=True, help="directory for the repacked wheel")
    args = parser.parse_args(argv)
    if not zipfile.is_zipfile(args.wheel):
        print(f"error: {args.wheel} is not a wheel (zip) file", file=sys.stderr)
        return 2
    out = repack_without(args.wheel, args.folders, args.out)
    print(f"{out}: {args.wheel.stat().st_size / 1e6:.1f} MB -> {out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
