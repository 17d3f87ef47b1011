"""Files that hold secrets: owner-only from the first byte.

Writing a file and then ``chmod``-ing it leaves a moment (and, on a crash, forever) in which the
secret sits in a file every local user can read. These helpers create the file with mode 0600
in the ``open`` call itself (the umask can only narrow it), write a temporary sibling and rename
it over the target so a reader never sees half a file, and keep the state folder 0700.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["create_private", "private_dir", "write_private"]

_FILE_MODE = 0o600
_DIR_MODE = 0o700
_TRAVERSE_MODE = 0o710


def private_dir(path: Path, *, group: int | None = None) -> Path:
    """Create ``path`` (and its parents) and make it owner-only.

    A folder left by an older version (or opened up by another tool) with mode 0755 is
    narrowed too.

    Args:
        path: The folder.
        group: A group that may pass through the folder (mode 0710, never list or read it):
            for a service that runs as another user and keeps its data in a subfolder.

    Returns:
        The path.
    """
    path.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    mode = _DIR_MODE
    if group is not None:
        os.chown(path, -1, group)
        mode = _TRAVERSE_MODE
    if path.stat().st_mode & 0o777 != mode:
        path.chmod(mode)
    return path


def _open_new(path: Path) -> int:
    # O_EXCL: never reuse a file someone else created (with other permissions); O_NOFOLLOW: never
    # write through a symlink planted in its place.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    return os.open(path, flags, _FILE_MODE)


def _write_all(fd: int, text: str) -> None:
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in a file that is 0600 from its first byte.

    The text goes to a temporary sibling that is renamed over ``path``, so a reader sees the
    old file or the new one, never a part, and the old file's permissions do not carry over.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()  # left by a process of the same pid that died mid-write
    _write_all(_open_new(temporary), text)
    os.replace(temporary, path)


def create_private(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` (mode 0600) unless it exists; never overwrite it.

    The whole text is written to a temporary sibling first and hard-linked into place, which
    fails if ``path`` exists: a concurrent reader never sees an empty or partial file.

    Returns:
        True if this call created the file.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    _write_all(_open_new(temporary), text)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        temporary.unlink()
    return True
