"""Issue 13, bundles: --force replaces only a bundle, hashes are verified, the manifest is validated on load.

Each case asserts the one line (or exit status and ``error:`` line for the CLI) and what is on disk after.
The property test mutates a real exported manifest at random: it loads (and is then consistent) or it
raises one ``SunEdgeError`` line, never anything else.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundle_helpers import leftovers, make_manifest, write_bundle
from cli_helpers import error_line, run
from sun_edge.bundle import MANIFEST, bundle_writer, check_destination, open_bundle, write_manifest
from sun_edge.errors import SunEdgeError


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    """The hash cache goes under this test's home, not the user's."""
    monkeypatch.setenv("SUN_EDGE_HOME", str(tmp_path / "home"))


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


def tree(path: Path) -> dict[str, bytes | None]:
    """Everything under ``path`` (file contents; None for folders), to compare before and after."""
    if path.is_file() or path.is_symlink():
        return {".": path.read_bytes() if path.is_file() else None}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


# --- --force replaces only a bundle ------------------------------------------------------------------------------------

def _users_folder(out: Path) -> None:
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "figures").mkdir()
    (out / "figures" / "a.png").write_bytes(b"png")


def _users_file(out: Path) -> None:
    out.write_text("my notes")


def _other_manifest(out: Path) -> None:
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"format": "someone-elses", "files": ["x"]}))
    (out / "x").write_text("x")


def _broken_manifest(out: Path) -> None:
    out.mkdir()
    (out / MANIFEST).write_text("{not json")


def _symlink(out: Path) -> None:
    target = out.parent / "real"
    write_bundle(target)
    out.symlink_to(target)


@pytest.mark.parametrize("make,why", [
    (_users_folder, "is a folder that is not a sun-edge bundle (it has no manifest.json)"),
    (_users_file, "is a file, not a sun-edge bundle"),
    (_other_manifest, "is a folder whose manifest.json is not a sun-edge manifest"),
    (_broken_manifest, "is a folder whose manifest.json is not a sun-edge manifest"),
    (_symlink, "is a symbolic link"),
])
@pytest.mark.parametrize("force", [False, True])
def test_force_never_replaces_what_is_not_a_bundle(tmp_path, make, why, force):
    out = tmp_path / "out"
    make(out)
    before, names = tree(out), sorted(p.name for p in tmp_path.iterdir())
    expected = f"{out} already exists and {why}; choose another -o (--force replaces only a sun-edge bundle)"
    with pytest.raises(SunEdgeError) as excinfo:
        check_destination(out, force)
    assert one_line(excinfo) == expected
    ran = []
    with pytest.raises(SunEdgeError) as excinfo:
        with bundle_writer(out, force) as tmp:
            ran.append(tmp)
    assert one_line(excinfo) == expected and ran == []
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == names


@pytest.mark.parametrize("name", [".", ".."])
def test_a_destination_must_name_a_new_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    write_bundle(tmp_path / "b")
    monkeypatch.chdir(tmp_path / "b")  # even inside a bundle, "." is not replaced
    with pytest.raises(SunEdgeError) as excinfo:
        check_destination(Path(name), force=True)
    assert one_line(excinfo) == f"-o {name} names no new folder; give the bundle a name, e.g. -o {Path(name, 'bundle')}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "home"] or sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_force_replaces_a_bundle_and_an_empty_folder(tmp_path):
    out = tmp_path / "b"
    write_bundle(out)
    (out / "unet.onnx").write_bytes(b"an older export")
    write_bundle(out, force=True)
    open_bundle(out, verify="full")
    empty = tmp_path / "empty"
    empty.mkdir()
    write_bundle(empty, force=True)
    assert (empty / MANIFEST).is_file() and leftovers(tmp_path) == []


def test_a_bundle_of_another_format_version_can_be_replaced(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"format": "sun-edge-bundle", "format_version": 99}))
    write_bundle(out, force=True)
    assert open_bundle(out).manifest.format_version == 1


def test_what_appears_during_an_export_is_not_replaced(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(SunEdgeError) as excinfo:
        with bundle_writer(out, force=True) as tmp:
            write_manifest(tmp, make_manifest(tmp))
            _users_folder(out)  # the user made it while the export ran
    assert "is a folder that is not a sun-edge bundle" in one_line(excinfo)
    assert (out / "thesis.tex").read_text() == "years of work" and leftovers(tmp_path) == []


@pytest.mark.parametrize("make", [_users_folder, _users_file])
def test_cli_export_force_refuses_the_users_files_before_loading(home_env, tmp_path, capsys, monkeypatch, make):
    from sun_edge.runtimes.pytorch import TorchRuntime

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(TorchRuntime, "load", no_loading)
    out = tmp_path / "out"
    make(out)
    before = tree(out)
    code, stdout, err = run(capsys, "export", "--target", "onnx", "--force", "-o", str(out))
    assert code == 2 and stdout == ""
    assert error_line(err).startswith(f"error: {out} already exists and is ")
    assert error_line(err).endswith("; choose another -o (--force replaces only a sun-edge bundle)")
    assert tree(out) == before and leftovers(tmp_path) == []


def test_a_killed_export_leaves_a_partial_that_the_next_one_removes(tmp_path):
    import signal
    import subprocess
    import sys

    code = ("import sys, time\nfrom sun_edge.bundle import bundle_writer\n"
            "with bundle_writer(sys.argv[1]) as tmp:\n"
            "    (tmp / 'unet.onnx').write_bytes(b'half')\n    print('exporting', flush=True)\n    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "b")], stdout=subprocess.PIPE, text=True, cwd="/")
    assert child.stdout.readline().strip() == "exporting"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".b.partial"]
    write_bundle(tmp_path / "b")
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


# --- hashes ------------------------------------------------------------------------------------------------------------

def flip_middle(path: Path, count: int = 64) -> None:
    """Flip ``count`` bytes in the middle of ``path`` (same size), keeping its mtime."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture()
def real_bundle(onnx_fp32_bundle, tmp_path) -> Path:
    """A private copy of the session's exported fp32 ONNX bundle."""
    return Path(shutil.copytree(onnx_fp32_bundle, tmp_path / "bundle"))


def test_a_flipped_unet_is_caught_by_full_and_cached_verification(real_bundle):
    open_bundle(real_bundle, verify="cached")  # verified once: cached
    flip_middle(real_bundle / "unet.onnx")
    before = tree(real_bundle)
    assert open_bundle(real_bundle, verify="sizes")  # sizes cannot see it
    expected = (f"bundle {real_bundle}: unet.onnx (unet) does not match the sha256 in manifest.json: the file was "
                "changed or damaged after export; re-export the bundle")
    for verify in ("full", "cached"):  # cached: the mtime was put back, the ctime was not
        with pytest.raises(SunEdgeError) as excinfo:
            open_bundle(real_bundle, verify=verify)
        assert one_line(excinfo) == expected
    assert tree(real_bundle) == before  # verification changes nothing


def test_the_cache_hashes_each_file_version_once(tmp_path, monkeypatch):
    import sun_edge.weights as weights

    write_bundle(tmp_path / "b")
    hashed = []
    real = weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    open_bundle(tmp_path / "b", verify="cached")
    assert sorted(hashed) == ["text_encoder.onnx", "unet.onnx", "vae_decoder.onnx"]
    hashed.clear()
    open_bundle(tmp_path / "b", verify="cached")
    open_bundle(tmp_path / "b")  # the default is "cached"
    assert hashed == []
    open_bundle(tmp_path / "b", verify="full")
    assert len(hashed) == 3
    hashed.clear()
    (tmp_path / "b" / "unet.onnx").write_bytes((tmp_path / "b" / "unet.onnx").read_bytes())  # rewritten, same bytes
    open_bundle(tmp_path / "b", verify="cached")
    assert hashed == ["unet.onnx"]
    cache = tmp_path / "home" / "cache" / "bundle-hashes.json"
    assert json.loads(cache.read_text())["format"] == "sun-edge-hash-cache"
    hashed.clear()
    (tmp_path / "b").rename(tmp_path / "moved")  # as an export's partial folder is renamed into place
    open_bundle(tmp_path / "moved", verify="cached")
    assert hashed == []
    shutil.copytree(tmp_path / "moved", tmp_path / "copy")
    open_bundle(tmp_path / "copy", verify="cached")
    assert len(hashed) == 3


def test_a_damaged_or_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    write_bundle(tmp_path / "b")
    cache = tmp_path / "home" / "cache" / "bundle-hashes.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("[[[not json")
    open_bundle(tmp_path / "b", verify="cached")
    assert json.loads(cache.read_text())["files"]
    monkeypatch.setenv("SUN_EDGE_HOME", str(tmp_path / "b" / MANIFEST / "x"))  # a home that cannot exist
    open_bundle(tmp_path / "b", verify="cached")


def test_a_lying_cache_entry_does_not_pass_a_changed_file(tmp_path):
    from sun_edge.bundle_hashes import load_cache, save_cache

    write_bundle(tmp_path / "b")
    open_bundle(tmp_path / "b", verify="cached")
    entries = load_cache()
    st = (tmp_path / "b" / "unet.onnx").stat()
    unet = f"{st.st_dev}:{st.st_ino}"
    save_cache({unet: {**entries[unet], "sha256": "f" * 64}})  # verified, but for another digest
    flip_middle(tmp_path / "b" / "unet.onnx", 1)
    with pytest.raises(SunEdgeError, match=r"unet.onnx \(unet\) does not match the sha256"):
        open_bundle(tmp_path / "b", verify="cached")


def test_unknown_verification_is_one_line(tmp_path):
    write_bundle(tmp_path / "b")
    with pytest.raises(SunEdgeError) as excinfo:
        open_bundle(tmp_path / "b", verify="quick")  # type: ignore[arg-type]
    assert one_line(excinfo) == "unknown bundle verification 'quick'; valid: sizes, cached, full"


# --- the manifest is validated -----------------------------------------------------------------------------------------

@pytest.fixture()
def bundle(tmp_path) -> Path:
    write_bundle(tmp_path / "b", components=("text_encoder", "unet", "vae_decoder", "vae_encoder"))
    return tmp_path / "b"


def edit(bundle: Path, change) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    change(data)
    (bundle / MANIFEST).write_text(json.dumps(data))


def _set(*path_and_value):
    *path, value = path_and_value

    def change(d):
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value
    return change


UNET_IN = ("components", "unet", "inputs")
CASES = [
    # wrong types name the field
    (_set("image", "height", "64"), "image.height must be an integer, found string '64'"),
    (_set("image", "width", True), "image.width must be an integer, found boolean True"),
    (_set("latent", "scaling_factor", float("nan")), "latent.scaling_factor must be a finite number, found number nan"),
    (_set("latent", "scaling_factor", -1), "latent.scaling_factor is -1, must be positive"),
    (_set("text", [77, 32]), r"text must be an object, found list \[77, 32\]"),
    (_set("scheduler", "steps", 0), "scheduler.steps is 0, outside 1..1000"),
    (_set("scheduler", "steps", 10**9), "scheduler.steps is 1000000000, outside 1..1000"),
    (_set("baseline", "guidance", "8"), "baseline.guidance must be a finite number, found string '8'"),
    (_set("precision", "int4"), "precision is 'int4'; valid values: fp32, fp16, or fp16-palN for N-bit palettized"),
    (_set("components", "unet", "precision", "fp16-pal5"), "components.unet.precision is 'fp16-pal5'; valid values"),
    (_set("model", "loras", [{"file": "x.safetensors", "scale": "strong"}]),
     r"model.loras\[0\].scale must be a finite number, found string 'strong'"),
    (_set("adapter", "sha256", "abc"), "adapter.sha256 must be a sha256"),
    (_set(*UNET_IN, 0, "shape", [1, 4, "8", 8]), r"components.unet.inputs\[0\].shape\[2\] must be a positive integer or -1"),
    (_set(*UNET_IN, 0, "dtype", "float128"), r"components.unet.inputs\[0\].dtype is 'float128'; valid values"),
    (_set("components", "unet", "files", "unet.onnx", -5), r"components.unet.files\['unet.onnx'\] is -5, outside"),
    (_set("components", "unet", "files", {}), "components.unet.files is missing or empty"),
    (_set("components", "unet", "sha256", "unet.onnx", "0" * 63), r"components.unet.sha256\['unet.onnx'\] must be a sha256"),
    # sizes that disagree
    (_set("image", "height", 128), "image is 128x64 and latent is 8x8: the image is not the latent times one power-of-two"),
    (lambda d: (d["image"].update(height=128, width=128)),
     r"components.vae_decoder.outputs are sample float32 \[1,3,64,64\], but the bundle's image 128x128, latent 4x8x8, "
     r"text 77x32 needs sample float32 \[1,3,128,128\]"),  # a PNG would have said 128x128 for a 64x64 image
    (lambda d: (d["image"].update(height=128, width=128), d["latent"].update(height=16, width=16)),
     r"components.unet.inputs are sample float32 \[1,4,8,8\].*needs sample float32 \[1,4,16,16\]"),
    (_set(*UNET_IN, 0, "shape", [1, 4, 8, 9]), r"components.unet.inputs are .*\[1,4,8,9\].* needs sample float32 \[1,4,8,8\]"),
    (_set("text", "dim", 768), r"components.text_encoder.outputs are last_hidden_state float32 \[1,77,32\], but .* needs"),
    (_set("components", "vae_decoder", "outputs", 0, "shape", [1, 3, 128, 128]), r"components.vae_decoder.outputs are"),
    (_set(*UNET_IN, 3, "name", "neg"), "components.unet.inputs are .*neg float32"),
    (_set(*UNET_IN, 0, "name", "\nerror: all is well"), r"components.unet.inputs are '\\nerror: all is well' float32"),
    (lambda d: d["components"].update(refiner=d["components"]["unet"]), "components.refiner is not a component"),
    # file names confined to the bundle
    (_set("components", "unet", "file", "/etc/passwd"), "components.unet.file is '/etc/passwd', an absolute path"),
    (_set("components", "unet", "file", "../other/unet.onnx"), r"components.unet.file is '../other/unet.onnx', which leads out"),
    (_set("components", "unet", "file", "C:\\unet.onnx"), r"components.unet.file is 'C:\\\\unet.onnx', an absolute path"),
    (_set("components", "unet", "file", "sub\\unet.onnx"), "which holds a backslash or a control character"),
    (lambda d: d["components"]["unet"]["files"].update({"/abs/unet.onnx": 3}), "components.unet.files key is '/abs/unet.onnx'"),
    (lambda d: d["components"]["unet"]["files"].update({"x\nerror: all is well": 3}), r"files key is 'x\\nerror: all is"),
    (lambda d: d["components"].update({"evil\nline": 1}), r"components.evil\\nline must be an object"),
    (lambda d: d["components"]["unet"]["sha256"].update({"../x": "0" * 64}), r"components.unet.sha256 key is '../x'"),
    (_set("tokenizer", "vocab", "/home/me/.ssh/id_rsa"), "tokenizer.vocab is '/home/me/.ssh/id_rsa', an absolute path"),
    (_set("components", "unet", "file", "other.onnx"), "components.unet.files does not list the component's file 'other.onnx'"),
    (lambda d: d["components"]["unet"]["sha256"].pop("unet.onnx"), "components.unet.sha256 and components.unet.files list"),
    (lambda d: d.setdefault("extra", {}).update(tensorrt={"engines": {"unet": {"file": "/tmp/x.plan", "tensorrt": "10.4",
                                                                               "sm": 70, "size": 1}}}),
     "extra.tensorrt.engines.unet.file is '/tmp/x.plan', an absolute path"),
    (lambda d: d.pop("image"), r"missing field\(s\) image; the manifest was edited or is incomplete: re-export the bundle"),
    (_set("format_version", True), "bundle format version True is not supported"),
]


@pytest.mark.parametrize("change,message", CASES)
def test_bad_manifests_are_one_line_naming_the_field(bundle, change, message):
    edit(bundle, change)
    before = tree(bundle)
    with pytest.raises(SunEdgeError) as excinfo:
        open_bundle(bundle)
    line = one_line(excinfo)
    assert line.startswith(f"{bundle / MANIFEST}") and "re-export the bundle" in line
    assert re.search(message, line), line
    assert tree(bundle) == before


def test_a_symlink_out_of_the_bundle_is_refused(bundle, tmp_path):
    secret = tmp_path / "secret.onnx"
    secret.write_bytes((bundle / "unet.onnx").read_bytes())
    (bundle / "unet.onnx").unlink()
    (bundle / "unet.onnx").symlink_to(secret)
    with pytest.raises(SunEdgeError) as excinfo:
        open_bundle(bundle, verify="sizes")
    assert one_line(excinfo) == (f"{bundle / MANIFEST}: components.unet.file 'unet.onnx' is a symbolic link that leads out "
                                 f"of the bundle folder (to {secret}); the bundle was tampered with: re-export it")
    os.unlink(bundle / "unet.onnx")
    (bundle / "unet.onnx").symlink_to("vae_decoder.onnx")  # inside the folder: its size decides
    with pytest.raises(SunEdgeError, match="unet.onnx has .* bytes, the manifest says"):
        open_bundle(bundle, verify="sizes")


def test_huge_or_deeply_nested_manifests_are_one_line(bundle):
    (bundle / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SunEdgeError) as excinfo:
        open_bundle(bundle)
    assert one_line(excinfo).startswith(f"{bundle / MANIFEST}: not valid JSON")
    with open(bundle / MANIFEST, "w") as f:
        f.truncate(17 << 20)
    with pytest.raises(SunEdgeError) as excinfo:
        open_bundle(bundle)
    assert "too big for a manifest" in one_line(excinfo)


def test_what_all_three_exporters_write_loads(tmp_path):
    """Core ML: int32 token ids, packages (folders) as component files; TensorRT: extra.tensorrt with engines."""
    coreml = tmp_path / "coreml"
    with bundle_writer(coreml) as tmp:
        manifest = make_manifest(tmp, ("text_encoder", "unet", "unet_plain", "vae_decoder", "vae_decoder_tiny"))
        data = json.loads(manifest.to_json())
        text = data["components"]["text_encoder"]
        text["inputs"][0]["dtype"] = "int32"
        (tmp / "TextEncoder.mlpackage" / "Data").mkdir(parents=True)
        (tmp / "text_encoder.onnx").rename(tmp / "TextEncoder.mlpackage" / "Data" / "model.mlmodel")
        rel = "TextEncoder.mlpackage/Data/model.mlmodel"
        text.update(file="TextEncoder.mlpackage", files={rel: text["files"].pop("text_encoder.onnx")},
                    sha256={rel: text["sha256"].pop("text_encoder.onnx")})
        data["target"], data["precision"] = "coreml", "fp16-pal6"
        data["components"]["unet"]["precision"] = "fp16-pal6"
        (tmp / MANIFEST).write_text(json.dumps(data))
    opened = open_bundle(coreml, verify="full").manifest
    assert opened.components["text_encoder"].inputs[0].dtype == "int32"
    assert opened.components["unet_plain"].inputs[0].shape == (-1, 4, 8, 8)

    trt = tmp_path / "trt"
    write_bundle(trt)
    from sun_edge.weights import sha256_file

    (trt / "unet.trt10.4.sm70.plan").write_bytes(b"engine")
    engine = {"file": "unet.trt10.4.sm70.plan", "tensorrt": "10.4.0", "sm": 70, "gpu": "V100", "size": 6,
              "sha256": sha256_file(trt / "unet.trt10.4.sm70.plan"), "build_seconds": 1.5, "opt_level": 3,
              "source": "unet.volta.onnx"}
    edit(trt, lambda d: d.update(target="tensorrt", extra={"tensorrt": {"profile": {}, "static_shapes": True, "batch": 1,
                                                                        "text_tokens": 77, "engines": {"unet": engine}}}))
    assert open_bundle(trt, verify="full").manifest.target == "tensorrt"
    flip_middle(trt / "unet.trt10.4.sm70.plan", 1)
    with pytest.raises(SunEdgeError) as excinfo:
        open_bundle(trt, verify="full")
    assert one_line(excinfo).endswith(f"rebuild it: sun-edge build-engines --bundle {trt} --force")


def test_the_real_exports_load_with_full_verification(onnx_fp32_bundle, onnx_fp16_bundle):
    for path in (onnx_fp32_bundle, onnx_fp16_bundle):
        assert set(open_bundle(path, verify="full").manifest.components) >= {"text_encoder", "unet", "unet_plain"}


# --- property: any mutation loads consistently or is one SunEdgeError line ---------------------------------------------

def _paths(node, prefix=()):
    """Every key path in a JSON tree."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


_LEAVES = (st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["/etc/passwd", "../x", "a/../../b", "C:\\x", "x\\y", "", ".",
                                                    "unet.onnx", "vocab.json", "float16", "int32", "fp16", "ddim", "-1"]))
JSON_VALUES = _LEAVES | st.lists(_LEAVES, max_size=4) | st.dictionaries(st.text(max_size=8), _LEAVES, max_size=4)


@st.composite
def mutations(draw, manifest: dict):
    data = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key, old = path[-1], parent[path[-1]]
        op = draw(st.sampled_from(["drop", "replace", "number", "shape", "path"]))
        if op == "drop":
            del parent[key]
        elif op == "number" and isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[key] = draw(st.sampled_from([0, -1, 1, 2, old + 1, old - 1, old * 2, old // 2 if isinstance(old, int)
                                                else old / 2, float(old), float("nan"), float("inf")]))
        elif op == "shape" and isinstance(old, list) and all(isinstance(x, int) for x in old):
            parent[key] = draw(st.sampled_from([old[:-1], old + [1], [x * 2 for x in old], [-1] + old[1:], old[::-1], []]))
        elif op == "path" and isinstance(old, str):
            parent[key] = draw(st.sampled_from(["/" + old, "../" + old, old + "/..", "./" + old, old.upper(), "sub/" + old]))
        else:
            parent[key] = draw(JSON_VALUES)
    return data


def _consistent(bundle_path: Path) -> None:
    """What a bundle that loaded must satisfy."""
    from sun_edge.components import COMPONENTS, Geometry

    m = open_bundle(bundle_path, verify="sizes").manifest
    f = m.image["height"] // m.latent["height"]
    assert m.image["height"] == m.latent["height"] * f and m.image["width"] == m.latent["width"] * f
    geometry = Geometry(m.image["height"], m.image["width"], m.latent["channels"], f, m.text["tokens"], m.text["dim"])
    for name, comp in m.components.items():
        want_in, want_out = COMPONENTS[name].io(geometry)
        assert [(s.name, s.shape) for s in comp.inputs] == [(s.name, s.shape) for s in want_in]
        assert [(s.name, s.shape) for s in comp.outputs] == [(s.name, s.shape) for s in want_out]
        for rel in (comp.file, *comp.files):
            target = (bundle_path / rel).resolve()
            assert bundle_path.resolve() in target.parents and target.exists()
    assert math.isfinite(m.latent["scaling_factor"]) and m.latent["scaling_factor"] > 0


@pytest.fixture(scope="module")
def mutable_bundle(onnx_fp32_bundle, tmp_path_factory) -> tuple[Path, dict]:
    """Hard links to the real bundle's files in a folder of its own: only manifest.json is rewritten per example."""
    folder = tmp_path_factory.mktemp("mutated") / "bundle"
    folder.mkdir()
    for p in onnx_fp32_bundle.iterdir():
        if p.name != MANIFEST:
            try:
                os.link(p, folder / p.name)
            except OSError:
                shutil.copy2(p, folder / p.name)
    return folder, json.loads((onnx_fp32_bundle / MANIFEST).read_text())


def test_the_unmutated_manifest_loads(mutable_bundle):
    folder, manifest = mutable_bundle
    (folder / MANIFEST).write_text(json.dumps(manifest))
    _consistent(folder)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_manifests_load_consistently_or_fail_in_one_line(mutable_bundle, data):
    folder, manifest = mutable_bundle
    mutated = data.draw(mutations(manifest))
    (folder / MANIFEST).write_text(json.dumps(mutated))
    try:
        _consistent(folder)
    except SunEdgeError as e:
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, message
        assert len(message) < 600, message
