"""``sun_edge.bundle``: the manifest, atomic bundle writing, and opening bundles with clear errors."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from bundle_helpers import leftovers, make_manifest, write_bundle
from no_torch import run_without_torch
from sun_edge.bundle import MANIFEST, bundle_writer, open_bundle, write_manifest
from sun_edge.errors import SunEdgeError


def test_manifest_round_trips_through_json(tmp_path):
    manifest = write_bundle(tmp_path / "b")
    opened = open_bundle(tmp_path / "b")
    assert opened.manifest == manifest
    assert opened.file("unet") == tmp_path / "b" / "unet.onnx"
    assert opened.manifest.components["unet"].input("sample").shape == (1, 4, 8, 8)
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
            (tmp / "unet.onnx").write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SunEdgeError, match="without writing manifest.json"):
        with bundle_writer(tmp_path / "b") as tmp:
            (tmp / "unet.onnx").write_bytes(b"no manifest")
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_force(tmp_path):
    out = tmp_path / "b"
    write_bundle(out)
    (out / "unet.onnx").write_bytes(b"old")
    ran = []
    with pytest.raises(SunEdgeError, match=r"already exists; pass --force to replace it"):
        with bundle_writer(out) as tmp:
            ran.append(tmp)
    assert ran == [] and (out / "unet.onnx").read_bytes() == b"old" and leftovers(tmp_path) == []

    with pytest.raises(RuntimeError):  # with force, a failure keeps the old bundle
        with bundle_writer(out, force=True):
            raise RuntimeError("boom")
    assert (out / "unet.onnx").read_bytes() == b"old" and leftovers(tmp_path) == []

    write_bundle(out, force=True)
    assert (out / "unet.onnx").read_bytes() != b"old" and (out / MANIFEST).is_file() and leftovers(tmp_path) == []
    open_bundle(out, verify="full")


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
    (lambda d: d["components"]["unet"].pop("inputs"), "components.unet has no inputs; .*re-export the bundle"),
    (lambda d: d["components"]["unet"]["files"].update({"unet.onnx": 3}), "unet.onnx has 1280 bytes, the manifest says 3"),
    (lambda d: (d["components"]["unet"]["files"].update({"unet.onnx.data": 3}),
                d["components"]["unet"]["sha256"].update({"unet.onnx.data": "2" * 64})), "is missing unet.onnx.data; re-export it"),
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
    opened = open_bundle(bundle, verify="sizes")
    data = bytearray((bundle / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 1  # same size
    (bundle / "unet.onnx").write_bytes(bytes(data))
    with pytest.raises(SunEdgeError, match="does not match the sha256"):
        opened.verify_hashes()
    with pytest.raises(SunEdgeError, match="has no unet_plain component; it has: text_encoder, unet, vae_decoder"):
        opened.file("unet_plain")


def test_manifest_json_is_plain_data(bundle):
    data = json.loads((bundle / MANIFEST).read_text())
    assert data["components"]["unet"]["outputs"][0] == {"name": "noise_pred", "dtype": "float32", "shape": [1, 4, 8, 8]}
    assert replace(open_bundle(bundle).manifest, parity={"unet": 1.0}).parity == {"unet": 1.0}


def test_bundle_module_imports_no_torch(bundle):
    run_without_torch(f"""
        from sun_edge.bundle import open_bundle
        assert open_bundle({str(bundle)!r}, verify="full").manifest.target == "onnx"
    """)
