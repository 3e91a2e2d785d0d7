"""Small valid bundles without exporting anything: fake graph files under a manifest that passes every check.

The geometry is the tiny model's at 64x64 (latents 4x8x8, text 77x32); component I/O comes from the
component table, as the exporters' does.
"""

from __future__ import annotations

from pathlib import Path

from sun_edge.bundle import Component, Manifest, bundle_writer, describe_files, write_manifest
from sun_edge.components import COMPONENTS, Geometry

GEOMETRY = Geometry(height=64, width=64, latent_channels=4, vae_scale_factor=8, text_tokens=77, text_dim=32)


def make_manifest(directory: Path, components: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder"),
                  precision: str = "fp16") -> Manifest:
    """Write a fake file per component (and the tokenizer files) into ``directory``; their manifest."""
    directory = Path(directory)
    comps = {}
    for i, name in enumerate(components):
        file = f"{name}.onnx"
        (directory / file).write_bytes(bytes(range(256)) * (4 + i))  # distinct sizes, a middle to flip
        inputs, outputs = COMPONENTS[name].io(GEOMETRY)
        sizes, hashes = describe_files(directory, [file])
        comps[name] = Component(file, inputs, outputs, COMPONENTS[name].precision(precision), sizes, hashes)
    (directory / "vocab.json").write_text("{}")
    (directory / "merges.txt").write_text("")
    return Manifest(target="onnx", precision=precision, image={"height": 64, "width": 64},
                    latent={"channels": 4, "height": 8, "width": 8, "scaling_factor": 0.18215},
                    text={"tokens": 77, "dim": 32}, components=comps,
                    model={"name": "m", "sha256": "0" * 64, "path": "m", "loras": []},
                    adapter={"name": "a", "sha256": "1" * 64}, scheduler={"name": "ddim", "spacing": "trailing", "steps": 4},
                    baseline={"name": "dpmpp_2m", "spacing": "linspace", "steps": 25, "guidance": 8.0},
                    tokenizer={"vocab": "vocab.json", "merges": "merges.txt"}, sun_edge_version="0.1.0")


def write_bundle(out: Path, force: bool = False, **kwargs) -> Manifest:
    """A complete small bundle at ``out``, through ``bundle_writer``."""
    with bundle_writer(out, force) as tmp:
        manifest = make_manifest(tmp, **kwargs)
        write_manifest(tmp, manifest)
    return manifest


def leftovers(parent: Path) -> list[str]:
    """Hidden entries of ``parent`` (partials, old copies)."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith("."))
