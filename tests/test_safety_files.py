"""Issue 13, files: atomic writes that honour the umask, leave nothing on failure and clean their stale partials;
weight files that hold code said so; adapter format versions checked."""

from __future__ import annotations

import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sun_edge import files
from sun_edge.errors import SunEdgeError


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message, message
    return message


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def umask():
    """Set a umask for one test (restored after)."""
    before = os.umask(0o022)
    os.umask(before)

    def set_to(value: int) -> int:
        os.umask(value)
        return value

    yield set_to
    os.umask(before)


def dead_pid() -> int:
    """The PID of a process that has just exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- modes ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_and_folders_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    files.write_bytes(tmp_path / "a.bin", b"x")
    files.write_text(tmp_path / "a.txt", "x")
    with files.atomic_directory(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert mode(tmp_path / "a.bin") == mode(tmp_path / "a.txt") == 0o666 & ~mask
    assert mode(tmp_path / "d") == 0o777 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.txt", "d"]


def test_png_and_adapter_get_the_umask_mode(tmp_path, umask, tiny):
    """They were 0600 under umask 0022 (mkstemp)."""
    from PIL import Image

    from sun_edge.adapter import SUNAdapter, save_adapter
    from sun_edge.imaging import save_png

    umask(0o022)
    save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png", "a prompt")
    save_adapter(SUNAdapter.from_unet(tiny["unet"]), tmp_path / "a.safetensors")
    assert mode(tmp_path / "x.png") == mode(tmp_path / "a.safetensors") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "x.png"]


def test_the_generated_tiny_model_is_not_private(tiny_home):
    """tiny.py wrote it with mkdtemp, so the folder was 0700 whatever the umask."""
    folder = tiny_home / "models" / "tiny-random"
    assert mode(folder) & 0o055 == 0o055 & ~_current_umask()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def _current_umask() -> int:
    value = os.umask(0)
    os.umask(value)
    return value


# --- failures leave nothing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise error

    with pytest.raises(type(error)):
        files.write_with(target, writer)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_folder_write_leaves_the_old_folder_and_no_partial(tmp_path, error):
    out = tmp_path / "d"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(type(error)):
        with files.atomic_directory(out, replace=True) as tmp:
            (tmp / "new").write_text("new")
            raise error
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and [p.name for p in out.iterdir()] == ["old"]


def test_a_folder_is_replaced_only_when_asked(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(SunEdgeError) as excinfo:
        with files.atomic_directory(out) as tmp:
            (tmp / "new").write_text("new")
    assert one_line(excinfo) == f"cannot write {out}: it already exists"
    assert [p.name for p in out.iterdir()] == ["old"] and [p.name for p in tmp_path.iterdir()] == ["d"]
    with files.atomic_directory(out, replace=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["d"]


def test_filesystem_errors_are_one_line(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "mine.txt").write_text("keep")
    with pytest.raises(SunEdgeError) as excinfo:
        files.write_bytes(tmp_path / "folder", b"x")
    assert one_line(excinfo) == f"cannot write {tmp_path / 'folder'}: it is a folder; choose a file name"
    assert (tmp_path / "folder" / "mine.txt").read_text() == "keep"
    with pytest.raises(SunEdgeError) as excinfo:
        files.write_text(tmp_path / "missing" / "x.txt", "x")
    assert one_line(excinfo).startswith(f"cannot write {tmp_path / 'missing' / 'x.txt'}: No such file or directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_save_png_into_a_folder_name_is_one_line(tmp_path):
    from PIL import Image

    from sun_edge.imaging import save_png

    (tmp_path / "x.png").mkdir()
    with pytest.raises(SunEdgeError) as excinfo:
        save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png")
    assert "it is a folder" in one_line(excinfo) and list((tmp_path / "x.png").iterdir()) == []


# --- stale partials ----------------------------------------------------------------------------------------------------

def test_stale_partials_of_the_destination_are_cleaned_and_nothing_else(tmp_path):
    gone, alive = dead_pid(), os.getppid()
    stale_dir = tmp_path / f".b.partial-{gone}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "unet.onnx").write_bytes(b"half")
    stale_file = tmp_path / f".b.partial-{gone}-89abcdef"
    stale_file.write_bytes(b"half")
    legacy = tmp_path / ".b.partial-k2j4_x9q"  # bundle_writer's mkdtemp name before this version: by age only
    legacy.mkdir()
    old_live = tmp_path / f".b.partial-{alive}-00000001"  # a running process's, but two days old
    old_live.mkdir()
    os.utime(old_live, (time.time() - 2 * 86400,) * 2)
    os.utime(legacy, (time.time() - 2 * 86400,) * 2)
    keep = [
        tmp_path / f".b.partial-{alive}-00000002",  # a running write
        tmp_path / f".c.partial-{gone}-00000003",  # another destination's
        tmp_path / f".b.partial-{gone}-nothex00",  # not sun-edge's naming
        tmp_path / f"b.partial-{gone}-00000004",  # not hidden
        tmp_path / ".b.partial-notes",
        tmp_path / "b",
    ]
    for path in keep:
        path.mkdir()
    link = tmp_path / f".b.partial-{gone}-00000005"
    link.symlink_to(tmp_path / "b")  # never followed or removed
    with files.atomic_directory(tmp_path / "b", replace=True) as tmp:
        (tmp / "x").write_text("x")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(p.name for p in keep + [link])
    assert not stale_dir.exists() and not stale_file.exists() and not legacy.exists() and not old_live.exists()


def test_an_old_copy_is_kept_while_its_destination_is_missing(tmp_path):
    """Killed between the two renames of a replace: the .old- folder is the only copy."""
    gone = dead_pid()
    old = tmp_path / f".b.old-{gone}-0123abcd"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    files.clean_stale_partials(tmp_path, "b")
    assert old.is_dir()
    (tmp_path / "b").mkdir()
    assert files.clean_stale_partials(tmp_path, "b") == [old] and not old.exists()


KILLED_WRITER = """
import os, sys, time
from sun_edge.files import atomic_directory, atomic_file
with atomic_directory(sys.argv[1] + "/bundle") as tmp, atomic_file(sys.argv[1] + "/image.png") as png:
    (tmp / "unet.onnx").write_bytes(b"half")
    png.write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_killed_write_leaves_partials_that_the_next_write_removes(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             cwd="/")
    assert child.stdout.readline().strip() == "writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert [n.split("-")[0] for n in left] == [".bundle.partial", ".image.png.partial"]  # what kill -9 leaves
    files.write_bytes(tmp_path / "image.png", b"png")
    with files.atomic_directory(tmp_path / "bundle") as tmp:
        (tmp / "unet.onnx").write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "image.png"]


def test_checkpoints_are_atomic_and_their_partials_cleaned(tmp_path, tiny, umask):
    from sun_edge.adapter import SUNAdapter
    from sun_edge.train.checkpoints import list_checkpoints, remove_partial, save_checkpoint

    umask(0o022)
    adapter = SUNAdapter.from_unet(tiny["unet"])
    (tmp_path / f".step-00000002.partial-{dead_pid()}-0123abcd").mkdir()  # a killed save
    (tmp_path / ".tmp-step-00000001-99999").mkdir()  # a killed save of sun-edge < 0.2
    (tmp_path / "notes.txt").write_text("mine")
    remove_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    for _ in range(2):  # the second save replaces the first (a resumed run with nothing left to do)
        final = save_checkpoint(tmp_path, 2, adapter=adapter, optimizer={}, scaler=None, state={"x": 1}, keep=3)
    assert [p for _, p in list_checkpoints(tmp_path)] == [final] and mode(final) == 0o755
    assert mode(final / "state.json") == mode(final / "adapter.safetensors") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step-00000002"]


def test_tensorrt_manifest_replace_is_atomic(tmp_path):
    from bundle_helpers import write_bundle
    from sun_edge.bundle import open_bundle
    from sun_edge.export.tensorrt import replace_manifest

    manifest = write_bundle(tmp_path / "b")
    replace_manifest(tmp_path / "b", manifest)
    assert open_bundle(tmp_path / "b").manifest == manifest
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".")]


# --- weights -----------------------------------------------------------------------------------------------------------

class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


class _Custom:
    pass


@pytest.mark.parametrize("make,imports", [
    (lambda p: __import__("torch").save({"w": _RunsCode()}, p), "posix.system"),  # torch 2.13: "... whose module posix is blocked"
    (lambda p: __import__("torch").save({"w": _Custom()}, p), "test_safety_files._Custom"),  # "Unsupported global: GLOBAL ..."
    (lambda p: p.write_bytes(pickle.dumps({"w": _RunsCode()}, protocol=4)), "posix.system"),  # fails on an opcode first
    (lambda p: p.write_bytes(pickle.dumps({"w": eval}, protocol=2)), "eval"),
])
def test_a_pickle_that_holds_code_is_reported_as_code(tmp_path, make, imports):
    from sun_edge.weights import read_state_dict

    path = tmp_path / "model.ckpt"
    make(path)
    with pytest.raises(SunEdgeError) as excinfo:
        read_state_dict(path, allow_pickle=True)
    assert one_line(excinfo) == (f"cannot load model.ckpt safely: it holds code, not only tensors (it imports {imports}), "
                                 "which loading would run; use a .safetensors file instead, or convert this one with a "
                                 "tool you trust")


@pytest.mark.parametrize("data", [os.urandom(1000), b"hello world", b"PK\x03\x04" + b"\x00" * 100])
def test_damaged_pickles_are_still_truncated_or_not_a_checkpoint(tmp_path, data):
    from sun_edge.weights import read_state_dict

    (tmp_path / "model.ckpt").write_bytes(data)
    with pytest.raises(SunEdgeError) as excinfo:
        read_state_dict(tmp_path / "model.ckpt", allow_pickle=True)
    assert one_line(excinfo).startswith("cannot read model.ckpt: file is truncated or not a PyTorch checkpoint")
    assert one_line(excinfo).endswith("; re-download it")


def test_an_adapter_of_an_unknown_format_version_is_refused(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    from sun_edge.adapter import SUNAdapter, load_adapter, save_adapter

    saved = save_adapter(SUNAdapter.from_unet(tiny["unet"]), tmp_path / "a.safetensors")
    assert load_adapter(saved, tiny["unet"].config).specs  # this version's own
    tensors = load_file(saved)
    for version in ("2", "0.9"):
        save_file(tensors, tmp_path / "newer.safetensors",
                  metadata={"format": "sun-edge-adapter", "format_version": version, "layout": "sun-edge"})
        with pytest.raises(SunEdgeError) as excinfo:
            load_adapter(tmp_path / "newer.safetensors", tiny["unet"].config)
        assert one_line(excinfo) == (f"adapter newer.safetensors has format version {version!r}, and this sun-edge reads "
                                     "version 1: upgrade sun-edge, or use an adapter saved by this version")
    save_file(tensors, tmp_path / "plain.safetensors")  # no metadata, as the released adapter: read by its keys
    assert load_adapter(tmp_path / "plain.safetensors", tiny["unet"].config).specs
