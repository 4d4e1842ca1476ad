"""Regenerate the betterproto2 code in karma8/rpc/gen from protos/ (``just proto``).

With ``--check`` nothing is written: the code is generated into a temporary directory and
compared with the committed files; any difference (drift) exits 1.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "karma8" / "rpc" / "gen"


def generate(out: Path) -> None:
    """Run protoc with the betterproto2 plugin over every .proto into ``out``."""
    sources = sorted(str(p) for p in PROTOS.rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"--python_betterproto2_out={out}",
            "--python_betterproto2_opt=client_generation=async,server_generation=async",
            *sources,
        ],
        check=True,
        # The plugin formats its output with ruff: run it where no pyproject.toml can
        # change that style, so the generated code does not depend on our settings.
        cwd=out,
        capture_output=True,
        # The plugin and the ruff it calls live beside this interpreter (the venv's bin),
        # which is not on PATH unless the venv is activated.
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )


def differences(a: Path, b: Path) -> list[str]:
    """Relative paths that differ between two trees (missing on either side included)."""
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    out = [f"{p} (only in one tree)" for p in cmp.left_only + cmp.right_only]
    out += [p for p in cmp.diff_files if not filecmp.cmp(a / p, b / p, shallow=False)]
    for sub in cmp.common_dirs:
        out += [f"{sub}/{p}" for p in differences(a / sub, b / sub)]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail on drift, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gen"
        out.mkdir()
        generate(out)
        if args.check:
            drift = differences(out, TARGET) if TARGET.exists() else ["karma8/rpc/gen missing"]
            for path in drift:
                print(f"drift: {path}", file=sys.stderr)
            if drift:
                print("generated code is stale: run `just proto`", file=sys.stderr)
                return 1
            print("generated protobuf code is up to date")
            return 0
        shutil.rmtree(TARGET, ignore_errors=True)
        shutil.copytree(out, TARGET)
    print(f"generated {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
