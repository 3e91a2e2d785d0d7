"""Named models, where they live on disk, and loading them into PyTorch.

A model is either a diffusers folder (``unet/``, ``text_encoder/``, ``vae/``) or a single
Stable Diffusion 1.x checkpoint file in the original LDM layout, as civitai distributes
fine-tunes. Single files are converted offline into models built from the bundled SD1.5
configs, with every key and shape checked; other architectures (SD2.x, SDXL, inpainting,
...) are recognised from their keys and shapes and refused by name.

Models live in ``models_home() / "models"``; ``SUN_EDGE_HOME`` moves the home, which
defaults to ``~/.cache/sun-edge``. Nothing here ever downloads: users put files in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from sun_edge.checkpoint import COMPONENTS, CONFIG_DIR, load_single_file
from sun_edge.errors import SunEdgeError, first_line
from sun_edge.weights import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    read_shapes,
    read_state_dict,
    sha256_file,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
POCKET_DIR = Path(__file__).resolve().parent / "data" / "pocket"  # the shipped Pocket SD family (package data)


@dataclass(frozen=True)
class ModelEntry:
    """A model users ask for by name.

    ``files`` are accepted single-file checkpoint names and ``folders`` accepted diffusers
    folder names, looked for in that order under the models directory; the first file is
    the one error messages ask for. ``source`` says where users obtain it (text only).
    """

    name: str
    display_name: str
    files: tuple[str, ...]
    folders: tuple[str, ...]
    source: str
    base: str = "sd15"
    generated: bool = False
    shipped: bool = False  # a diffusers folder inside the package (POCKET_DIR / name)


MODELS = MappingProxyType(
    {
        entry.name: entry
        for entry in (
            ModelEntry(
                "sd15",
                "Stable Diffusion v1.5",
                ("v1-5-pruned-emaonly.safetensors", "v1-5-pruned.safetensors", "sd15.safetensors"),
                ("stable-diffusion-v1-5", "sd15"),
                "Hugging Face stable-diffusion-v1-5/stable-diffusion-v1-5, formerly runwayml/stable-diffusion-v1-5",
            ),
            ModelEntry(
                "toonyou",
                "ToonYou beta 6",
                ("toonyou_beta6.safetensors", "toonyou.safetensors"),
                ("toonyou",),
                "civitai",
            ),
            ModelEntry(
                "realistic-vision-v51",
                "Realistic Vision V5.1",
                (
                    "realisticVisionV51_v51VAE.safetensors",
                    "Realistic_Vision_V5.1_fp16-no-ema.safetensors",
                    "realistic-vision-v51.safetensors",
                ),
                ("Realistic_Vision_V5.1_noVAE", "realistic-vision-v51"),
                "civitai, or Hugging Face SG161222/Realistic_Vision_V5.1_noVAE",
            ),
            ModelEntry(
                "anything-v5",
                "Anything V5 (PRT)",
                ("AnythingV5V3_v5PrtRE.safetensors", "anything-v5.safetensors"),
                ("anything-v5",),
                "civitai",
            ),
            ModelEntry(
                "rev-animated",
                "ReV Animated v1.2.2",
                ("revAnimated_v122EOL.safetensors", "revAnimated_v122.safetensors", "rev-animated.safetensors"),
                ("rev-animated",),
                "civitai",
            ),
            ModelEntry("fancy-pet", "Fancy Pet", ("fancy-pet.safetensors",), ("fancy-pet",), "civitai"),
            ModelEntry(
                "pocket-base",
                "Pocket SD base: a small SD-architecture model trained on sun-edge's world of coloured shapes",
                (),
                ("pocket-base",),
                "shipped with sun-edge (retrain: scripts/train_pocket.py)",
                base="pocket",
                shipped=True,
            ),
            ModelEntry(
                "pocket-toon",
                "Pocket SD toon: pocket-base fine-tuned to an outlined, posterized style",
                (),
                ("pocket-toon",),
                "shipped with sun-edge (retrain: scripts/train_pocket.py)",
                base="pocket",
                shipped=True,
            ),
            ModelEntry(
                "tiny-random",
                "tiny random SD1.5-architecture model",
                (),
                ("tiny-random",),
                "generated locally on first use",
                generated=True,
            ),
        )
    }
)


@dataclass(frozen=True)
class ControlNetEntry:
    """A ControlNet users ask for by name (``--controlnet NAME``): a diffusers folder under ``POCKET_DIR``."""

    name: str
    display_name: str
    folder: str  # under POCKET_DIR
    model: str  # the registry model it was trained on (frozen)
    condition: str  # what its control image shows


CONTROLNETS = MappingProxyType(
    {
        entry.name: entry
        for entry in (
            ControlNetEntry(
                "pocket-silhouette",
                "Pocket SD silhouette ControlNet (retrain: scripts/train_pocket_controlnet.py)",
                "controlnet-silhouette",
                "pocket-base",
                "the shapes' silhouettes, white on black, at the image size",
            ),
        )
    }
)


def resolve_controlnet(name_or_path: str) -> Path:
    """``--controlnet`` text -> a file or folder: an existing path wins, then ``CONTROLNETS`` names."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    entry = CONTROLNETS.get(name_or_path)
    if entry is None:
        if _looks_like_path(name_or_path):
            raise SunEdgeError(f"ControlNet path {name_or_path} does not exist")
        raise SunEdgeError(f"unknown ControlNet '{name_or_path}': pass a file or folder path, or one of: "
                           f"{', '.join(CONTROLNETS)}")
    if not (POCKET_DIR / entry.folder / "config.json").is_file():
        raise SunEdgeError(f"ControlNet '{entry.name}' should ship inside sun-edge but {POCKET_DIR / entry.folder} "
                           "is missing: reinstall sun-edge, or retrain it with scripts/train_pocket_controlnet.py")
    return POCKET_DIR / entry.folder


def models_home() -> Path:
    """The sun-edge home: ``$SUN_EDGE_HOME``, or ``~/.cache/sun-edge``."""
    env = os.environ.get("SUN_EDGE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sun-edge"


def models_dir() -> Path:
    """Where named models are looked for: ``models_home() / "models"``."""
    return models_home() / "models"


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "unet" / "config.json").is_file()


def _find_installed(entry: ModelEntry, directory: Path) -> Path | None:
    if entry.shipped:
        return POCKET_DIR / entry.name if _is_diffusers_folder(POCKET_DIR / entry.name) else None
    for file in entry.files:
        if (directory / file).is_file():
            return directory / file
    for folder in entry.folders:
        if _is_diffusers_folder(directory / folder):
            return directory / folder
    return None


def _looks_like_path(text: str) -> bool:
    return any(sep in text for sep in ("/", "\\", os.sep)) or text.startswith((".", "~")) or (
        Path(text).suffix.lower() in WEIGHT_SUFFIXES
    )


def resolve_model(name_or_path: str) -> Path:
    """Turn ``--model`` text into a file or folder: an existing path wins, then registry names.

    ``tiny-random`` is generated on first use. A registry model that is not installed, a
    path that does not exist and an unknown name each raise a one-line error saying what
    to put where.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    entry = MODELS.get(name_or_path)
    if entry is None:
        if _looks_like_path(name_or_path):
            raise SunEdgeError(f"model path {name_or_path} does not exist")
        raise SunEdgeError(
            f"unknown model '{name_or_path}': pass a file or folder path, or one of: {', '.join(MODELS)}"
        )
    directory = models_dir()
    if entry.generated:
        from sun_edge.tiny import ensure_tiny_random

        return ensure_tiny_random(directory)
    found = _find_installed(entry, directory)
    if found is None and entry.shipped:
        raise SunEdgeError(f"model '{entry.name}' should ship inside sun-edge but {POCKET_DIR / entry.name} is missing: "
                           f"reinstall sun-edge, or retrain it with scripts/train_pocket.py")
    if found is None:
        wanted = entry.files[0] if entry.files else f"the diffusers folder {entry.folders[0]}"
        raise SunEdgeError(
            f"model '{entry.name}' is not installed: put {wanted} ({entry.display_name}, from {entry.source}) "
            f"in {directory}/", fix="model_path"
        )
    return found


def list_models() -> list[tuple[ModelEntry, Path | None]]:
    """Every registry entry with the local file or folder it resolves to, or None if absent."""
    directory = models_dir()
    return [(entry, _find_installed(entry, directory)) for entry in MODELS.values()]


@dataclass
class LoadedModel:
    """A model ready for inference: float32, eval mode, no gradients.

    ``sha256`` identifies the weights: for a single-file checkpoint it is the file's hash;
    for a diffusers folder it is the hash of the UNet weight file
    (``unet/diffusion_pytorch_model[.fp16].safetensors``), the component the adapter is
    fused into, or None when the UNet is sharded. ``loras`` lists what was merged:
    (file name, scale, sha256).
    """

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    name: str
    path: Path
    sha256: str | None
    loras: tuple[tuple[str, float, str], ...] = ()


def load_model(
    name_or_path: str,
    *,
    loras: Sequence[tuple[Path, float]] = (),
    allow_pickle: bool = False,
    config_dir: Path | None = None,
) -> LoadedModel:
    """Load a named model, a diffusers folder or a single SD1.x checkpoint, then merge LoRAs.

    ``config_dir`` replaces the bundled SD1.5 configs (``unet/``, ``text_encoder/``,
    ``vae/`` each with ``config.json``) used to build models for single-file checkpoints.
    """
    from sun_edge.lora import merge_lora

    absent = [str(lora_path) for lora_path, _ in loras if not Path(lora_path).is_file()]
    if absent:  # before a model load that can take a while
        raise SunEdgeError(f"LoRA file {absent[0]} does not exist")
    path = resolve_model(name_or_path)
    is_name = name_or_path in MODELS and not Path(name_or_path).expanduser().exists()
    if path.is_dir():
        components, sha256 = _load_folder(path, allow_pickle), _folder_sha256(path)
    else:
        components = load_single_file(path, config_dir or CONFIG_DIR, allow_pickle=allow_pickle)
        sha256 = sha256_file(path)
    for module in components.values():
        module.float().eval().requires_grad_(False)
    merged: list[tuple[str, float, str]] = []
    for lora_path, scale in loras:
        lora_path = Path(lora_path)
        state = read_state_dict(lora_path, allow_pickle=allow_pickle)
        merge_lora(components["unet"], components["text_encoder"], state, scale, source=lora_path.name)
        del state
        merged.append((lora_path.name, float(scale), sha256_file(lora_path)))
    return LoadedModel(
        unet=components["unet"],
        text_encoder=components["text_encoder"],
        vae=components["vae"],
        name=name_or_path if is_name else (path.name if path.is_dir() else path.stem),
        path=path,
        sha256=sha256,
        loras=tuple(merged),
    )


def _weight_file(directory: Path, stem: str, allow_pickle: bool) -> tuple[Path, bool, str | None]:
    """Pick a component's weights: (file, is_safetensors, variant). Safetensors first, fp32 first."""
    for suffix, safe in ((".safetensors", True), (".bin", False)):
        for variant in (None, "fp16"):
            name = f"{stem}.{variant}{suffix}" if variant else f"{stem}{suffix}"
            for candidate in (directory / name, directory / f"{name}.index.json"):
                if candidate.is_file():
                    if not safe and not allow_pickle:
                        raise SunEdgeError(
                            f"refusing to load pickle checkpoint {directory.name}/{candidate.name}: pickle files "
                            "can run code", fix="allow_pickle")
                    return candidate, safe, variant
    raise SunEdgeError(f"no weights in {directory}: expected {stem}.safetensors")


def _load_folder(path: Path, allow_pickle: bool) -> dict[str, Any]:
    """Load a diffusers folder's three components with ``from_pretrained``, offline and strict."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    missing = [c for c in COMPONENTS if not (path / c / "config.json").is_file()]
    if missing:
        raise SunEdgeError(
            f"{path} is not a diffusers model folder: missing {', '.join(f'{c}/config.json' for c in missing)}"
        )
    # diffusers names the dtype argument torch_dtype, transformers 5 dtype; without
    # accelerate diffusers skips random init anyway (no_init_weights), so say so to silence it.
    diffusers_args = {"torch_dtype": torch.float32, "low_cpu_mem_usage": False}
    classes = {
        "unet": (UNet2DConditionModel, "diffusion_pytorch_model", diffusers_args),
        "text_encoder": (CLIPTextModel, "model", {"dtype": torch.float32}),
        "vae": (AutoencoderKL, "diffusion_pytorch_model", diffusers_args),
    }
    loaded = {}
    for component, (cls, stem, extra_args) in classes.items():
        weights, safe, variant = _weight_file(path / component, stem, allow_pickle)
        if component == "unet":
            _check_unet_channels(path, weights, safe)
        try:
            model, info = cls.from_pretrained(
                str(path / component),
                local_files_only=True,
                use_safetensors=safe,
                variant=variant,
                output_loading_info=True,
                **extra_args,
            )
        except Exception as error:  # whatever a damaged folder makes diffusers/transformers raise
            first = first_line(error)
            raise SunEdgeError(f"cannot load {path.name}/{component}: {first}") from error
        problems = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(problems.values()):
            summary = ", ".join(f"{len(v)} {k.replace('_', ' ')} (first: {v[0]})" for k, v in problems.items() if v)
            raise SunEdgeError(f"{path.name}/{component} weights do not match its config: {summary}")
        loaded[component] = _own_memory(model)
    return loaded


def _check_unet_channels(path: Path, weights: Path, safe: bool) -> None:
    """A folder's UNet: its config's ``in_channels`` must be what its conv_in weight holds (checked in the
    safetensors header before loading), and one sun-edge runs: the latents (4) or inpainting's 9."""
    from sun_edge.checkpoint import unet_channels

    config = json.loads((path / "unet" / "config.json").read_text())
    declared = int(config.get("in_channels", 4))
    if safe and weights.suffix == ".safetensors":
        conv_in = read_shapes(weights).get("conv_in.weight")
        if conv_in is not None and len(conv_in) == 4 and conv_in[1] != declared:
            raise SunEdgeError(f"{path.name}/unet/config.json says in_channels {declared}, but its conv_in weight takes "
                               f"{conv_in[1]} channels; fix the config (an inpainting UNet has 9)")
    allowed = unet_channels({"out_channels": config.get("out_channels", 4)})
    if declared not in allowed:
        kind = {8: "an InstructPix2Pix"}.get(declared, f"a {declared}-channel")
        raise SunEdgeError(f"{path.name} has {kind} UNet ({declared} input channels); sun-edge runs SD1.x "
                           f"text-to-image ({allowed[0]}) and inpainting ({allowed[1]}) UNets")


def _own_memory(module: Any) -> Any:
    """Copy every tensor into freshly allocated memory, one tensor at a time.

    Loaders hand out tensors that are views of the memory-mapped weight file: they stay
    tied to the file, and their addresses are not 64-byte aligned, which makes CPU matmul
    kernels round differently from a model built in memory (differences of ~1e-6). Owned,
    aligned copies make a loaded model compute bit-identically to the original.
    """
    import itertools

    import torch

    with torch.no_grad():
        for _, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
            tensor.data = torch.empty_like(tensor, memory_format=torch.contiguous_format).copy_(tensor)
    return module


def _folder_sha256(path: Path) -> str | None:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        if (path / "unet" / name).is_file():
            return sha256_file(path / "unet" / name)
    return None


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """Parse ``--lora FILE[:SCALE]``; the scale defaults to 1.0.

    Only the text after the last ``:`` can be a scale, and only when it is not itself part
    of a path (no separator, no weight-file suffix) and the whole text is not an existing
    file, so ``C:\\loras\\x.safetensors`` and ``a:b.safetensors`` stay paths.
    """
    import math

    text = text.strip()
    head, sep, tail = text.rpartition(":")
    is_scale = (
        sep
        and head
        and not any(c in tail for c in "/\\")
        and Path(tail).suffix.lower() not in WEIGHT_SUFFIXES
        and not Path(text).expanduser().is_file()
    )
    if not is_scale:
        if not text:
            raise SunEdgeError("empty --lora argument: expected FILE[:SCALE]")
        return Path(text).expanduser(), 1.0
    try:
        scale = float(tail)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale):
        raise SunEdgeError(
            f"bad LoRA scale '{tail}' in --lora {text}: expected FILE[:SCALE] with SCALE a number like 0.8"
        )
    return Path(head).expanduser(), scale
