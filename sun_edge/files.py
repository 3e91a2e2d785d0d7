"""Atomic writes: a file or a folder appears complete at its destination, or not at all.

Everything sun-edge writes (PNGs, adapters, manifests, engines, bundles, checkpoints) goes
through here. A write goes to a hidden *partial* beside the destination, in the same folder
(so the final rename is atomic), and is renamed into place only when complete::

    .NAME.partial-<pid>-<8 hex>     the write in progress (a file or a folder)
    .NAME.old-<pid>-<8 hex>         a folder being replaced, for the moment between two renames

On any failure, ``KeyboardInterrupt`` included, the partial is removed and the destination is
left as it was. A process killed mid-write (``kill -9``, power loss) cannot clean up, so every
write first removes the *stale* partials of its own destination: those whose process is gone,
or older than ``STALE_AFTER``. Nothing that does not match the names above is ever removed,
nor anything another user owns, nor a symbolic link; an ``.old-`` folder is removed only while
its destination exists (otherwise it may be the only copy left).

Modes honour the umask: partial files are created with ``os.open(..., 0o666)`` and folders with
``os.mkdir(..., 0o777)``, so the kernel applies the process's umask exactly as for any new
file (``tempfile.mkstemp`` and ``mkdtemp`` would make them private, 0600 and 0700). An error of
the filesystem (full disk, no permission, a folder where the file should go) is one
:class:`SunEdgeError` line naming the path.

Imports neither NumPy nor torch.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sun_edge.errors import SunEdgeError

STALE_AFTER = 24 * 3600.0  # seconds: a partial this old is stale even if its PID is alive (PID reuse, other hosts)
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-[A-Za-z0-9_]{8}$")  # bundle_writer's mkdtemp names, before 0.2


def partial_path(dest: Path, kind: str = "partial") -> Path:
    """A fresh partial name beside ``dest``: ``.NAME.partial-<pid>-<8 hex>``."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows: go by age only
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def clean_stale_partials(parent: Path, name: str | None = None, *, max_age: float = STALE_AFTER,
                         now: float | None = None) -> list[Path]:
    """Remove stale partials in ``parent`` (of destination ``name``, or of any name); returns what was removed.

    Stale: the PID in its name is not a running process (on this machine), or it is older than
    ``max_age`` seconds (mtime). Partials of this process are never stale by PID.
    """
    parent = Path(parent)
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = _PARTIAL.match(entry.name) or _LEGACY.match(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISLNK(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
            continue
        pid = int(match["pid"]) if "pid" in match.groupdict() and match["pid"] else None
        dead = pid is not None and pid != os.getpid() and not _pid_alive(pid)
        if not (dead or now - info.st_mtime > max_age):
            continue
        if match["kind"] == "old" and not (parent / match["name"]).exists():
            continue  # killed between the two renames of a replace: this is the only copy
        path = Path(entry.path)
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not os.path.lexists(path):
            removed.append(path)
    return removed


def _fail(dest: Path, error: OSError) -> SunEdgeError:
    reason = error.strerror or str(error) or type(error).__name__
    return SunEdgeError(f"cannot write {dest}: {reason}; check the folder and the free space")


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(dest: Path | str, *, fsync: bool = False) -> Iterator[Path]:
    """Yield an empty partial file beside ``dest`` (mode 0666 less the umask); on success it replaces ``dest``.

    Write it by path (``PIL.Image.save``, ``safetensors.save_file``, ``torch.save``); a writer that
    replaces the file with its own (safetensors makes it 0600) gets the partial's mode back. On any
    exception it is removed and ``dest`` is untouched. ``fsync`` flushes the data and the rename.
    """
    dest = Path(dest)
    clean_stale_partials(dest.parent, dest.name)
    tmp = partial_path(dest)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        want = stat.S_IMODE(os.stat(tmp).st_mode)  # 0666 less the umask, applied by the kernel
    except OSError as e:
        raise _fail(dest, e) from e
    try:
        yield tmp
        if stat.S_IMODE(os.stat(tmp).st_mode) != want:  # a writer that made its own file (safetensors: 0600)
            os.chmod(tmp, want)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if dest.is_dir() and not dest.is_symlink():
            raise SunEdgeError(f"cannot write {dest}: it is a folder; choose a file name")
        os.replace(tmp, dest)
        if fsync:
            _fsync_dir(dest.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _fail(dest, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_with(dest: Path | str, writer: Callable[[Path], object], *, fsync: bool = False) -> Path:
    """``writer(partial_path)`` writes the file; it is renamed to ``dest`` when ``writer`` returns."""
    with atomic_file(dest, fsync=fsync) as tmp:
        writer(tmp)
    return Path(dest)


def write_bytes(dest: Path | str, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``dest`` atomically."""
    return write_with(dest, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def write_text(dest: Path | str, text: str, *, encoding: str = "utf-8", fsync: bool = False) -> Path:
    """Write ``text`` to ``dest`` atomically."""
    return write_with(dest, lambda tmp: tmp.write_text(text, encoding=encoding), fsync=fsync)


@contextmanager
def atomic_directory(dest: Path | str, *, replace: bool = False, fsync: bool = False,
                     before_commit: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty partial folder beside ``dest`` (mode 0777 less the umask); on success it becomes ``dest``.

    ``before_commit(partial)`` runs after the body and may raise to abort (a check that the
    contents are complete, that ``dest`` may still be replaced). An existing ``dest`` is an
    error unless ``replace``; then it is moved aside, the new folder renamed into place, and the
    old one removed (a kill between the two renames leaves the old one as ``.NAME.old-*``, which
    is not cleaned while ``dest`` is missing). On any exception the partial is removed and
    ``dest`` is untouched; only the renames' own filesystem errors become a ``SunEdgeError``.
    """
    dest = Path(dest)
    clean_stale_partials(dest.parent, dest.name)
    tmp = partial_path(dest)
    try:
        os.mkdir(tmp, 0o777)
    except OSError as e:
        raise _fail(dest, e) from e
    try:
        yield tmp  # the body's own errors pass through as they are
        if before_commit is not None:
            before_commit(tmp)
        try:
            _commit_directory(tmp, dest, replace, fsync)
        except OSError as e:
            raise _fail(dest, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit_directory(tmp: Path, dest: Path, replace: bool, fsync: bool) -> None:
    """Rename ``tmp`` to ``dest``, moving an existing ``dest`` aside first (``replace``) and removing it after."""
    old = None
    if os.path.lexists(dest):
        if not replace:
            raise SunEdgeError(f"cannot write {dest}: it already exists")
        old = partial_path(dest, "old")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if fsync:
        _fsync_dir(dest.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
