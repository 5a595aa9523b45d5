"""Publishing files and directories atomically: build under a temporary name beside the destination, then one
rename puts it in place, so a reader sees the old thing or the whole new one, never a half-written one.

    with publish_file(Path("out/model.pte")) as tmp:   # tmp: <out>/.model.pte.tmp-XXXX/model.pte
        write(tmp)                                      # renamed to out/model.pte when the block succeeds
    with publish_dir(Path("out/ckpt")) as tmp:          # tmp: <out>/.ckpt.tmp-XXXX/, empty
        ...                                             # replaces out/ckpt (if any) when the block succeeds

A failed or interrupted block leaves the destination as it was; the temporary is removed on failure, and what a
killed process leaves (names starting with the prefix) is never read and can be swept by `sweep`. Also here: the
file lock that serialises publishers, and sha256_file. Standard library only.
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20
FILE_MODE, DIR_MODE = 0o644, 0o755  # mkstemp/mkdtemp's 0600/0700 would hide artifacts from other users' runners


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (a file, created if missing, or a directory) for the block; released when the
    process dies. Lock a directory to guard a file that is replaced by rename: its new inode has no lock."""
    fd = os.open(path, os.O_RDONLY if Path(path).is_dir() else os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def temp_prefix(final: Path) -> str:
    return f".{Path(final).name}.tmp-"


@contextlib.contextmanager
def publish_dir(final: Path, prefix: str | None = None) -> Iterator[Path]:
    """A fresh empty directory beside `final`; on success it replaces `final` (a directory, if any) by a rename.

    prefix: the temporary's name prefix (default `.<name>.tmp-`), for callers that sweep what killed runs left.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = prefix or temp_prefix(final)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        if final.exists():  # os.rename refuses to replace a non-empty directory: move the old one aside first
            remove_dir(final, prefix)
        os.rename(tmp, final)
        fsync(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def publish_file(final: Path, prefix: str | None = None) -> Iterator[Path]:
    """A path with `final`'s own name inside a temporary directory beside it (some writers, a .pt2 archive's,
    read the name); on success the file is synced and renamed over `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=prefix or temp_prefix(final), dir=final.parent))
    try:
        tmp = scratch / final.name
        yield tmp
        os.chmod(tmp, FILE_MODE)
        fsync(tmp)
        os.replace(tmp, final)
        fsync(final.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_file(final: Path, data: bytes) -> None:
    """Publish `data` as `final`."""
    with publish_file(final) as tmp:
        tmp.write_bytes(data)


def remove_dir(directory: Path, prefix: str | None = None) -> bool:
    """Make `directory` disappear at once (one rename), then delete it; False if it did not exist."""
    directory = Path(directory)
    trash = directory.parent / f"{prefix or temp_prefix(directory)}old-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(directory, trash)
    except FileNotFoundError:
        return False
    _remove(trash)
    return True


def sweep(parent: Path, prefix: str) -> None:
    """Remove what killed publishes under `prefix` left in `parent` (call it under the publishers' lock)."""
    for stale in Path(parent).glob(f"{prefix}*"):
        _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
