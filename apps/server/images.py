"""Images in requests: base64 decoding under the limits, and A1111's img2img and ControlNet fields.

``decode_image`` takes base64 or a ``data:image/...;base64,`` URL, refuses text over
``Limits.max_image_bytes``, reads the size from the header and refuses more than
``Limits.max_image_pixels`` before any pixel is decoded (a decompression bomb costs nothing), and
opens PNG, JPEG, WebP and BMP only. ``read_img2img`` reads A1111's img2img fields (init_images, mask,
denoising_strength, mask_blur, inpainting_mask_invert, inpaint_full_res, resize_mode) and
``read_controlnet`` the sd-webui-controlnet API's ``alwayson_scripts.controlnet.args`` (one unit,
preprocessor ``none``). Each failure is one 4xx line naming the field; nothing here needs a model.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image, UnidentifiedImageError

from sun_edge.settings import Settings
from sun_edge_server.limits import ApiError, Limits, field_flag, field_fraction, field_int

FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
RESIZE_MODES = {0: "just resize", 1: "crop and resize"}  # A1111's 2 (resize and fill), 3 (latent upscale): refused
A1111_MASK_BLUR = 4  # A1111's default
MAX_MASK_BLUR = 64
MAX_CONTROL_SCALE = 2.0


def decode_image(value: Any, name: str, limits: Limits, kind: str = "RGB") -> Image.Image:
    """A base64 image (or data URL) as a decoded PIL image: ``RGB``, or ``L`` for a mask (its alpha if it has one)."""
    if not isinstance(value, str) or not value.strip():
        raise ApiError(422, f"{name} must be a base64 PNG, JPEG, WebP or BMP image (or a data URL), "
                            f"got {type(value).__name__ if not isinstance(value, str) else 'an empty string'}", name)
    text = value
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(422, f"{name} is a data URL without base64 data (expected data:image/png;base64,...)", name)
    if len(text) > limits.max_image_bytes:
        raise ApiError(413, f"{name} is {len(text)} characters of base64; the limit is {limits.max_image_bytes} "
                            "(send a smaller image: the model's own size is enough)", name)
    text = "".join(text.split())
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{name} is not valid base64", name) from None
    try:
        image = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ApiError(422, f"{name} has far more pixels than the limit of {limits.max_image_pixels}; send a "
                            "smaller image", name) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ApiError(422, f"{name} is not a PNG, JPEG, WebP or BMP image", name) from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise ApiError(422, f"{name} is {width}x{height} pixels, over the limit of {limits.max_image_pixels} "
                            "pixels; send a smaller image", name)
    if width < 1 or height < 1:
        raise ApiError(422, f"{name} is {width}x{height} pixels: empty", name)
    try:
        image.load()
        if kind == "L":
            has_alpha = image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)
            if has_alpha and image.convert("RGBA").getextrema()[3] != (255, 255):
                return image.convert("RGBA").getchannel("A")  # A1111: a mask with transparency is its alpha
            return image.convert("L")
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ApiError(422, f"{name} is not a whole {image.format} image (truncated or corrupt)", name) from None


@dataclass(frozen=True)
class Edit:
    """A request's images and editing settings, in the library's terms (``Job`` fields and ``Settings`` fields)."""

    init_images: tuple[Image.Image, ...] = ()
    mask: Image.Image | None = None
    control_image: Image.Image | None = None  # ControlNet's condition (None with init images: the init image)
    control: bool = False
    strength: float = 1.0
    mask_blur: int = 0
    invert_mask: bool = False
    paste_back: bool = False
    control_scale: float = 1.0
    resize: str = "crop and resize"
    notes: tuple[str, ...] = ()  # what was read but is not used, for the answer's warnings

    def settings(self, settings: Settings) -> Settings:
        """``settings`` with this edit's fields (a plain txt2img keeps the library's defaults)."""
        fields: dict[str, Any] = {}
        if self.init_images:
            fields["strength"] = self.strength
        if self.mask is not None:
            fields.update(mask_blur=self.mask_blur, invert_mask=self.invert_mask, paste_back=self.paste_back)
        if self.control:
            fields["control_scale"] = self.control_scale
        return replace(settings, **fields) if fields else settings

    def images_for(self, index: int, width: int, height: int) -> dict[str, Any]:
        """The ``Job`` image fields of image ``index`` of the request, at ``width`` x ``height`` for 'just resize'."""
        out: dict[str, Any] = {}
        if self.init_images:
            init = self.init_images[index % len(self.init_images)]
            mask = self.mask
            if self.resize == "just resize" and init.size != (width, height):  # A1111 stretches; the library crops
                init = init.resize((width, height), Image.Resampling.LANCZOS)
                mask = mask.resize((width, height), Image.Resampling.LANCZOS) if mask is not None else None
            out["init_image"] = init
            if mask is not None:
                out["mask"] = mask
        if self.control:
            out["control_image"] = self.control_image if self.control_image is not None else out["init_image"]
        return out


def read_img2img(body: dict[str, Any], limits: Limits, count: int) -> Edit:
    """A1111's img2img fields: the init images (one for every image, or one per image of a batch) and the mask."""
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise ApiError(422, "init_images is required: a list of one base64 image (or one per image of the batch)",
                       "init_images")
    if len(images) > 1 and len(images) != count:
        raise ApiError(422, f"init_images has {len(images)} images; send one, or one per image ({count})", "init_images")
    inits = tuple(decode_image(v, f"init_images[{i}]", limits) for i, v in enumerate(images))
    strength = field_fraction(body, "denoising_strength", 0.75)  # A1111's default
    resize_mode = field_int(body, "resize_mode", 0, 0, 3)
    if resize_mode not in RESIZE_MODES:
        raise ApiError(422, f"resize_mode {resize_mode} ({'resize and fill' if resize_mode == 2 else 'latent upscale'})"
                            " is not supported; use 0 (just resize) or 1 (crop and resize)", "resize_mode")
    edit = Edit(init_images=inits, strength=strength, resize=RESIZE_MODES[resize_mode])
    if body.get("mask") in (None, ""):
        return edit
    mask = decode_image(body["mask"], "mask", limits, kind="L")
    for i, init in enumerate(inits):
        if init.size != mask.size:
            raise ApiError(422, f"mask is {mask.size[0]}x{mask.size[1]} but init_images[{i}] is {init.size[0]}x"
                                f"{init.size[1]}; send a mask of the init image's size (white = repaint)", "mask")
    if field_flag(body, "inpaint_full_res", False):
        raise ApiError(422, "inpaint_full_res (A1111's 'Only masked') is not supported: this server inpaints the "
                            "whole picture; send inpaint_full_res: false", "inpaint_full_res")
    notes = ()
    if body.get("inpainting_fill", 1) != 1:
        notes = ("inpainting_fill is not used: the masked region starts from the init image (A1111's 'original')",)
    return replace(edit, mask=mask, mask_blur=field_int(body, "mask_blur", A1111_MASK_BLUR, 0, MAX_MASK_BLUR),
                   invert_mask=field_flag(body, "inpainting_mask_invert", False),
                   paste_back=field_flag(body, "paste_back", True), notes=notes)


def read_controlnet(body: dict[str, Any], limits: Limits, served: str | None, names: tuple[str, ...],
                    img2img: bool) -> tuple[Image.Image | None, float, tuple[str, ...]] | None:
    """The enabled sd-webui-controlnet unit of ``alwayson_scripts``: (condition image or None for the init image,
    weight, notes), or None when the request names no ControlNet. ``served`` is the loaded ControlNet's title."""
    scripts = body.get("alwayson_scripts")
    if scripts in (None, {}):
        return None
    if not isinstance(scripts, dict):
        raise ApiError(422, "alwayson_scripts must be an object of script name to {\"args\": [...]}", "alwayson_scripts")
    key = next((k for k in scripts if isinstance(k, str) and k.lower() == "controlnet"), None)
    if key is None:
        return None
    where = f"alwayson_scripts.{key}.args"
    args = scripts[key].get("args") if isinstance(scripts[key], dict) else None
    if not isinstance(args, list) or not all(isinstance(u, dict) for u in args):
        raise ApiError(422, f"{where} must be a list of ControlNet units (objects)", "alwayson_scripts")
    notes: list[str] = []
    units = []
    for i, unit in enumerate(args):
        if unit.get("enabled", True) is False:
            continue
        if unit.get("model") in ("None", "none"):
            notes.append(f"{where}[{i}] has model None: skipped, as sd-webui-controlnet skips it")
            continue
        units.append((i, unit))
    if not units:
        return None
    if served is None:
        raise ApiError(422, "this server loads no ControlNet (start it with sun-edge serve --controlnet FILE); "
                            "drop alwayson_scripts.controlnet", "alwayson_scripts")
    if len(units) > 1:
        raise ApiError(422, f"{where} has {len(units)} enabled units; this server runs one ControlNet at a time",
                       "alwayson_scripts")
    i, unit = units[0]
    at = f"{where}[{i}]"
    model = unit.get("model")
    if model not in (None, "", served, *names):
        raise ApiError(422, f"{at}.model {str(model)[:60]!r} is not loaded; this server's ControlNet is {served!r}",
                       "alwayson_scripts")
    module = unit.get("module")
    if module not in (None, "", "none", "None"):
        raise ApiError(422, f"{at}.module {str(module)[:40]!r}: preprocessors are not run here; send the condition "
                            "image already made and module \"none\"", "alwayson_scripts")
    for name, default in (("guidance_start", 0.0), ("guidance_end", 1.0)):
        if unit.get(name, default) != default:
            raise ApiError(422, f"{at}.{name} {str(unit[name])[:20]}: only {default:g} is supported (the ControlNet "
                                "runs at every step)", "alwayson_scripts")
    if unit.get("control_mode", 0) not in (0, "Balanced"):
        raise ApiError(422, f"{at}.control_mode {str(unit['control_mode'])[:40]!r}: only Balanced (0) is supported",
                       "alwayson_scripts")
    weight = unit.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= MAX_CONTROL_SCALE:
        raise ApiError(422, f"{at}.weight must be a number in [0, {MAX_CONTROL_SCALE:g}], got {str(weight)[:20]}",
                       "alwayson_scripts")
    picture = unit.get("image", unit.get("input_image"))
    if isinstance(picture, dict):  # newer sd-webui-controlnet: {"image": b64, "mask": b64}
        picture = picture.get("image")
    if picture in (None, ""):
        if not img2img:
            raise ApiError(422, f"{at}.image is required on txt2img: the ControlNet's condition image, base64",
                           "alwayson_scripts")
        return None, float(weight), tuple(notes)  # sd-webui-controlnet conditions on the init image
    return decode_image(picture, f"{at}.image", limits), float(weight), tuple(notes)
