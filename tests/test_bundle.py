"""``sun_edge.bundle``: the manifest, atomic bundle writing, and opening bundles with clear errors."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from no_torch import run_without_torch
from sun_edge.bundle import (
    MANIFEST,
    Component,
    Manifest,
    TensorSpec,
    bundle_writer,
    describe_files,
    open_bundle,
    write_manifest,
)
from sun_edge.errors import SunEdgeError


def make_manifest(directory: Path) -> Manifest:
    """A small valid manifest whose one component file is written into ``directory``."""
    (directory / "g.onnx").write_bytes(b"graph bytes")
    (directory / "vocab.json").write_text("{}")
    (directory / "merges.txt").write_text("")
    sizes, hashes = describe_files(directory, ["g.onnx"])
    comp = Component("g.onnx", (TensorSpec("x", "float32", (1, 4, 8, 8)),), (TensorSpec("y", "float32", (-1, 4)),),
                     "fp16", sizes, hashes)
    return Manifest(target="onnx", precision="fp16", image={"height": 64, "width": 64},
                    latent={"channels": 4, "height": 8, "width": 8, "scaling_factor": 0.18215}, text={"tokens": 77, "dim": 32},
                    components={"g": comp}, model={"name": "m", "sha256": "0" * 64, "path": "m", "loras": []},
                    adapter={"name": "a", "sha256": "1" * 64}, scheduler={"name": "ddim", "spacing": "trailing", "steps": 4},
                    baseline={"name": "dpmpp_2m", "spacing": "linspace", "steps": 25, "guidance": 8.0},
                    tokenizer={"vocab": "vocab.json", "merges": "merges.txt"}, sun_edge_version="0.1.0")


def write_bundle(out: Path, force: bool = False) -> Manifest:
    with bundle_writer(out, force) as tmp:
        manifest = make_manifest(tmp)
        write_manifest(tmp, manifest)
    return manifest


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_manifest_round_trips_through_json(tmp_path):
    manifest = write_bundle(tmp_path / "b")
    opened = open_bundle(tmp_path / "b")
    assert opened.manifest == manifest
    assert opened.file("g") == tmp_path / "b" / "g.onnx"
    assert opened.manifest.components["g"].input("x").shape == (1, 4, 8, 8)
    opened.verify_hashes()


def test_bundle_writer_renames_into_place_only_when_complete(tmp_path):
    out = tmp_path / "b"
    with bundle_writer(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".b.partial-")
        write_manifest(tmp, make_manifest(tmp))
        assert not out.exists()  # nothing at the destination until the end
    assert (out / MANIFEST).is_file() and leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's private 0700


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with bundle_writer(tmp_path / "b") as tmp:
            (tmp / "g.onnx").write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SunEdgeError, match="without writing manifest.json"):
        with bundle_writer(tmp_path / "b") as tmp:
            (tmp / "g.onnx").write_bytes(b"no manifest")
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_force(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.txt").write_text("old")
    ran = []
    with pytest.raises(SunEdgeError, match=r"already exists; pass --force to replace it"):
        with bundle_writer(out) as tmp:
            ran.append(tmp)
    assert ran == [] and (out / "old.txt").read_text() == "old" and leftovers(tmp_path) == []

    with pytest.raises(RuntimeError):  # with force, a failure keeps the old bundle
        with bundle_writer(out, force=True):
            raise RuntimeError("boom")
    assert (out / "old.txt").read_text() == "old" and leftovers(tmp_path) == []

    write_bundle(out, force=True)
    assert not (out / "old.txt").exists() and (out / MANIFEST).is_file() and leftovers(tmp_path) == []


def test_destination_folder_must_exist(tmp_path):
    with pytest.raises(SunEdgeError, match="output folder .* does not exist; create it first"):
        with bundle_writer(tmp_path / "missing" / "b"):
            pass


@pytest.fixture()
def bundle(tmp_path) -> Path:
    write_bundle(tmp_path / "b")
    return tmp_path / "b"


def edit(bundle: Path, change) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    change(data)
    (bundle / MANIFEST).write_text(json.dumps(data))


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(format="other"), "is not a sun-edge bundle manifest"),
    (lambda d: d.update(format_version=2), "bundle format version 2 is not supported .*re-export the bundle"),
    (lambda d: d.pop("components"), "missing field.* components; the manifest was edited or is incomplete"),
    (lambda d: d["components"]["g"].pop("inputs"), "malformed components entry"),
    (lambda d: d["components"]["g"]["files"].update({"g.onnx": 3}), "g.onnx has 11 bytes, the manifest says 3"),
    (lambda d: d["components"]["g"]["files"].update({"g.onnx.data": 3}), "is missing g.onnx.data; re-export it"),
])
def test_open_bundle_errors_name_the_problem(bundle, change, message):
    edit(bundle, change)
    with pytest.raises(SunEdgeError, match=message):
        open_bundle(bundle)


def test_open_bundle_path_problems(tmp_path, bundle):
    with pytest.raises(SunEdgeError, match="does not exist or is not a directory"):
        open_bundle(tmp_path / "nope")
    with pytest.raises(SunEdgeError, match="is not a bundle: it has no manifest.json"):
        open_bundle(tmp_path)
    (bundle / "vocab.json").unlink()
    with pytest.raises(SunEdgeError, match="is missing vocab.json"):
        open_bundle(bundle)
    (bundle / MANIFEST).write_text("{not json")
    with pytest.raises(SunEdgeError, match="not valid JSON"):
        open_bundle(bundle)


def test_changed_files_fail_the_hash_check(bundle):
    opened = open_bundle(bundle)
    (bundle / "g.onnx").write_bytes(b"graph bytez")  # same size
    with pytest.raises(SunEdgeError, match="does not match the sha256"):
        opened.verify_hashes()
    with pytest.raises(SunEdgeError, match="has no unet component; it has: g"):
        opened.file("unet")


def test_manifest_json_is_plain_data(bundle):
    data = json.loads((bundle / MANIFEST).read_text())
    assert data["components"]["g"]["outputs"][0] == {"name": "y", "dtype": "float32", "shape": [-1, 4]}
    assert replace(open_bundle(bundle).manifest, parity={"g": 1.0}).parity == {"g": 1.0}


def test_bundle_module_imports_no_torch(bundle):
    run_without_torch(f"""
        from sun_edge.bundle import open_bundle
        assert open_bundle({str(bundle)!r}).manifest.target == "onnx"
    """)
