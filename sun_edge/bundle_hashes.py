"""A bundle's files against the sha256 its manifest records, hashed once per file version.

``verify_hashes(bundle, use_cache=...)`` recomputes the sha256 of every file the manifest
records one for (each component's ``sha256``; TensorRT engines that are present with their
recorded size) and raises one line naming the first that differs. ``open_bundle`` calls it:
``verify="full"`` (``sun-edge parity``) hashes everything now; ``verify="cached"`` (``generate``,
the runtimes, the server) skips files already verified in the same version.

Why a cache file, not an in-process cache: each ``sun-edge generate`` is a new process, and an
SD1.5 bundle is 2 to 4 GB, which takes seconds to hash on every run (and tens of seconds from
a slow disk); an in-process cache would only help a long-lived server. So the verified versions
are kept in ``<sun-edge home>/cache/bundle-hashes.json`` (``$SUN_EDGE_HOME``, default
``~/.cache/sun-edge``): per file (device and inode), its size, ``mtime_ns`` and ``ctime_ns``, and
the sha256 that matched. A file is skipped only if all of these are unchanged and the manifest
still records that sha256. ``ctime`` is in the key because a file rewritten in place with its
mtime restored (``touch -d``, ``cp -p``, ``rsync -t``) still gets a new ctime, which no user tool
can set back. The file's identity is its inode rather than its path, so the verification an
export runs on its partial folder still counts once that folder is renamed into place (a rename
changes no file's inode or ctime); a copy is a new inode, hashed once more.

The cache only ever skips work: a missing, unreadable or damaged cache file is treated as empty,
and an unwritable home only means the next run hashes again. It holds at most ``MAX_ENTRIES``
files (the oldest are dropped), and is written atomically, merged with what other processes
wrote in the meantime.

NumPy-free and torch-free.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sun_edge.errors import SunEdgeError

if TYPE_CHECKING:
    from sun_edge.bundle import Bundle

CACHE_FILE = "bundle-hashes.json"
CACHE_FORMAT = "sun-edge-hash-cache"
MAX_ENTRIES = 4096


def cache_path() -> Path:
    """``<sun-edge home>/cache/bundle-hashes.json``."""
    from sun_edge.models import models_home

    return models_home() / "cache" / CACHE_FILE


def _key(path: Path) -> tuple[str, list[int]]:
    """The file's identity (``dev:ino``) and version (size, mtime_ns, ctime_ns)."""
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}", [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def recorded_files(bundle: Bundle) -> list[tuple[str, str, str]]:
    """``(file, sha256, what)`` for every file with a recorded sha256 (``what`` names its component or engine)."""
    out = [(rel, digest, name) for name, comp in bundle.manifest.components.items() for rel, digest in comp.sha256.items()]
    engines = ((bundle.manifest.extra or {}).get("tensorrt") or {}).get("engines", {})
    for name, record in engines.items():
        file = bundle.path / record["file"]
        if record.get("sha256") and file.is_file() and file.stat().st_size == record["size"]:
            out.append((record["file"], record["sha256"], f"{name} engine"))  # a missing or resized one is rebuilt
    return out


def verify_hashes(bundle: Bundle, *, use_cache: bool) -> None:
    """Raise one line for the first recorded file whose sha256 differs (``use_cache``: skip versions verified before)."""
    from sun_edge.bundle import MANIFEST
    from sun_edge.weights import sha256_file

    cache = load_cache() if use_cache else {}
    verified: dict[str, dict[str, Any]] = {}
    for rel, digest, what in recorded_files(bundle):
        file = bundle.path / rel
        try:
            where, key = _key(file)
            known = cache.get(where)
            if known is not None and known.get("key") == key and known.get("sha256") == digest:
                continue
            actual = sha256_file(file)
        except OSError as e:
            raise SunEdgeError(f"bundle {bundle.path}: cannot read {rel} ({what}): {e.strerror or e}") from e
        if actual != digest:
            fix = (f"rebuild it: sun-edge build-engines --bundle {bundle.path} --force" if what.endswith("engine")
                   else "re-export the bundle")
            raise SunEdgeError(f"bundle {bundle.path}: {rel} ({what}) does not match the sha256 in {MANIFEST}: "
                               f"the file was changed or damaged after export; {fix}")
        verified[where] = {"key": key, "sha256": digest, "path": str(file), "at": time.time()}
    if verified:
        save_cache(verified)


def load_cache(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The cache's entries (empty if it is missing or unreadable)."""
    path = cache_path() if path is None else path
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return {k: v for k, v in data["files"].items() if isinstance(v, dict)}


def save_cache(entries: dict[str, dict[str, Any]], path: Path | None = None) -> None:
    """Merge ``entries`` into the cache file (atomically); failures are ignored: the cache only saves work."""
    from sun_edge.files import write_text

    path = cache_path() if path is None else path
    try:
        files = {**load_cache(path), **entries}
        if len(files) > MAX_ENTRIES:
            newest = sorted(files.items(), key=lambda kv: float(kv[1].get("at") or 0.0))[-MAX_ENTRIES:]
            files = dict(newest)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"format": CACHE_FORMAT, "version": 1, "files": files}) + "\n")
    except (OSError, SunEdgeError, TypeError, ValueError):
        pass  # a read-only or full home: the next run hashes again
