"""Write the test vectors and text tables of the Swift package (apps/macos), computed by sun-edge itself.

Everything the Swift code must reproduce is computed here by the functions the product uses, so
that the package's tests (XCTest, on a Mac) can check the Swift port number for number:

    tokens.json        CLIP token ids of 30+ prompts (sun_edge.tokenizer.CLIPTokenizer, clean_text)
    noise.json         torch-compatible initial noise for several seeds and shapes (sun_edge.noise)
    schedules.json     alpha_bar, sigmas, timesteps and coefficients (sun_edge.sampling.NoiseSchedule)
    trajectories.json  whole DDIM-4 and DPM-Solver++-25 runs (sun_edge.sampling.sample) driven by
                       ``analytic_eps`` in place of the UNet
    tiny_manifest.json the manifest of the tiny-random model exported with ``sun-edge export --target coreml``
    reference.json     the end-to-end reference: that model's image for one prompt/seed, made by the
    reference.png      PyTorch reference runtime through ``sun_edge.Pipeline`` (as ``sun-edge generate``)

and, for the library itself, ``Sources/SUNEdgeKit/Resources/clip_text_tables.json``: the tables of
Python's text handling the tokenizer relies on (HTML entities, ftfy's maps, Windows-1252, ``str.lower``,
``str.isspace``, the regex classes), taken from the modules sun-edge uses.

    python scripts/make_swift_vectors.py --bundle /path/to/tiny-coreml   # manifest + reference from a bundle
    python scripts/make_swift_vectors.py --export                        # export the tiny bundle first (CLI)
    python scripts/make_swift_vectors.py                                 # the bundle-free files only
    python scripts/make_swift_vectors.py --reference-only OUT.json --bundle DIR   # the macOS workflow

tests/test_swift_vectors.py regenerates the bundle-free files and checks them against independent
references (torch.randn, diffusers' schedulers, open_clip's tokenizer).
"""

from __future__ import annotations

import argparse
import base64
import html
import html.entities
import io
import json
import subprocess
import sys
import tempfile
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "apps" / "macos"
VECTORS_DIR = PACKAGE / "Tests" / "SUNEdgeKitTests" / "Resources"
TABLES_FILE = PACKAGE / "Sources" / "SUNEdgeKit" / "Resources" / "clip_text_tables.json"
TINY_SIZE = 64  # the tiny bundle's image side: latents [1, 4, 8, 8]

LONG_PROMPT = "a photo of " + ", ".join(["a red apple on a wooden table"] * 12) + ", and one final purple zebra"
PROMPTS = [
    "a photo of a cat",
    "a photo of an astronaut riding a horse on the moon, detailed, sharp focus",
    "blurry, lowres, watermark, text",
    "a cat, (masterpiece:1.2), [blurry]!!! -- 100%",
    "((best quality)), 8k uhd, dslr, {{lowres}}, bad_hands, worst-quality...",
    "café crème, naïve façade, Ångström, São Paulo",
    "a cute dog 🐶🔥 with ❤️ and 👍🏽",
    "猫の写真, 一只可爱的小猫, 고양이 사진",
    "schÃ¶n and cafÃ©",  # mojibake ftfy repairs
    "Itâ€™s a dogâ€™s life",  # Windows-1252 mojibake of a curly apostrophe
    "The Quick BROWN fox's tail, it's 3.14159 meters & 42 cm, 1/2 or 1,000,000 in 2024",
    "Tom &amp; Jerry &lt;3 &amp;amp; &quot;quoted&quot; &#39;apos&#39;",
    "&eacute;t&eacute; &EACUTE;T&EACUTE; &notit; &ampfoo &#x1F600; &#128512; &#0; &#x110000; &#150;",
    "<b>bold</b> &amp; <i>html</i> after a tag",
    "   lots\tof \n\n whitespace   ",
    "",
    "it's, we're, they've, I'm, you'll, he'd, don't, ''s",
    LONG_PROMPT,  # past 77 tokens: truncated
    " ".join(["cat"] * 75),  # exactly 77 with BOS and EOS
    " ".join(["cat"] * 76),  # one token too many
    "\u201cCurly quotes\u201d and \u2018single\u2019 ones \u2014 em dash \u2013 en dash \u2026 ellipsis",
    "ﬁne ﬂowers, ＦＵＬＬＷＩＤＴＨ\u3000ｔｅｘｔ, ｶﾀｶﾅ, ĳssel",
    "ΣΊΣΥΦΟΣ ΟΔΟΣ, Straße, İstanbul, ǅemal",  # final sigma, dotted capital I, a digraph ftfy splits
    "Ω ≈ ç√∫˜µ≤≥÷ ¡™£¢∞§¶•ªº–≠",
    "a<|endoftext|>b <|startoftext|> c",  # special tokens typed in a prompt
    "!<|endoftext|> <|ENDOFTEXT|>",  # CLIP's regex: punctuation swallows "<|"; lowercased, the second is special
    "Привет, мир! Ελληνικά, עברית, العربية, हिन्दी",
    "x\u0301 e\u0301 combining accents and \u00e9",  # NFC composes e + U+0301
    "zero\u200bwidth\u200djoiner \ufeffbom \u00a0nbsp \u3000ideographic \x0bvt \x1cfs",
    "\x1b[31mred terminal\x1b[0m text\x07bell",
    "line one\r\nline two\rline three\u2028four\x85five",
    "1234567890 ½ ² ③ Ⅻ ٣ 4k 1080p v1.5",
    "Ünïcödé ŁÓDŹ Ærøskøbing Œuvre, masterpiece, best quality, ultra-detailed, 8k wallpaper",
]


# ---- tokenizer ---------------------------------------------------------------------------------------------------


def token_vectors() -> dict[str, Any]:
    """Ids, BPE tokens and cleaned text of ``PROMPTS`` as sun-edge's tokenizer makes them."""
    from sun_edge.tokenizer import CONTEXT_LENGTH, CLIPTokenizer, PromptTruncatedWarning, clean_text

    tok = CLIPTokenizer.default()
    cases = []
    for prompt in PROMPTS:
        tokens = tok.tokenize(prompt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            ids = tok.encode(prompt)
        cut = tok.decode(tokens[CONTEXT_LENGTH - 2:]) if len(tokens) > CONTEXT_LENGTH - 2 else None
        assert (cut is not None) == bool(caught), prompt
        cases.append({"prompt": prompt, "clean": clean_text(prompt), "tokens": tokens,
                      "ids": [int(i) for i in ids[0]], "truncated": cut})
    return {"about": "sun_edge.tokenizer.CLIPTokenizer.default(): encode (ids, 77), tokenize (BPE ids), "
                     "clean_text (clean); truncated: the text encode cuts (decode of tokens[75:]), else null",
            "vocab": "sun_edge/data/vocab.json", "merges": "sun_edge/data/merges.txt",
            "context_length": CONTEXT_LENGTH, "bos": tok.bos_id, "eos": tok.eos_id, "cases": cases}


# ---- noise -------------------------------------------------------------------------------------------------------

NOISE_CASES = [  # (seed, shape): the block path, its 16-value tail, the scalar path, the 32-bit seed wrap
    (0, (1, 4, 8, 8)), (1, (1, 4, 8, 8)), (42, (1, 4, 8, 8)), (2**31 - 1, (1, 4, 8, 8)), (2**32 - 1, (1, 4, 8, 8)),
    (2**32 + 7, (1, 4, 8, 8)), (7, (1, 4, 8, 8)), (2**64 - 1, (1, 4, 8, 8)),
    (0, (1, 4, 64, 64)), (1234, (1, 4, 64, 64)), (0, (1, 4, 96, 64)),
    (3, (1, 4, 9, 7)), (5, (17,)), (5, (16,)), (11, (7,)), (11, (3, 5)), (13, (1,)), (13, (2,)),
]
NOISE_FULL_LIMIT = 1024  # values stored in full up to this size; beyond it the first and last 64 and checksums


def checksums(values: np.ndarray) -> dict[str, float]:
    """Sums in float64 of float32 values: plain, absolute, squared."""
    v = values.astype(np.float64).reshape(-1)
    return {"sum": float(v.sum()), "sum_abs": float(np.abs(v).sum()), "sum_squares": float((v * v).sum())}


def noise_vectors() -> dict[str, Any]:
    from sun_edge.noise import initial_noise

    cases = []
    for seed, shape in NOISE_CASES:
        values = initial_noise(seed, shape, kind="torch").reshape(-1)
        case: dict[str, Any] = {"seed": seed, "seed_decimal": str(seed),  # exact in any JSON reader
                                "shape": list(shape), "checksums": checksums(values)}
        if values.size <= NOISE_FULL_LIMIT:
            case["values"] = values.tolist()
        else:
            case["head"], case["tail"] = values[:64].tolist(), values[-64:].tolist()
        cases.append(case)
    return {"about": "sun_edge.noise.initial_noise(seed, shape, kind='torch'), row-major float32; checksums in "
                     "float64; seeds up to 2**64 - 1 (only the low 32 bits count)", "cases": cases}


# ---- schedules and samplers --------------------------------------------------------------------------------------

SCHEDULE_RUNS = [  # (scheduler, spacing, steps); the first two are SUN's default and the CFG baseline's
    ("ddim", "trailing", 4), ("dpmpp_2m", "linspace", 25),
    ("ddim", "trailing", 1), ("ddim", "trailing", 8), ("ddim", "trailing", 25), ("ddim", "leading", 4),
    ("ddim", "linspace", 4), ("dpmpp_2m", "trailing", 4), ("dpmpp_2m", "leading", 25), ("dpmpp_2m", "trailing", 25),
]


def schedule_run(scheduler: str, spacing: str, steps: int) -> dict[str, Any]:
    """The timesteps and coefficients ``sample_ddim`` / ``sample_dpmpp_2m`` use for one run."""
    from sun_edge.sampling import SD15

    a = SD15.alphas_cumprod()
    run: dict[str, Any] = {"scheduler": scheduler, "spacing": spacing, "steps": steps}
    if scheduler == "ddim":
        ts = np.round(SD15.timesteps(steps, spacing)).astype(np.int64)
        jump = SD15.num_train_timesteps // steps
        run["timesteps"] = ts.tolist()
        run["alphas"] = [float(a[t]) for t in ts]
        run["alphas_prev"] = [float(a[t - jump] if t - jump >= 0 else a[0]) for t in ts]
    else:
        ts = np.round(SD15.timesteps(steps, spacing, grid="intervals")).astype(np.int64)
        run["timesteps"] = ts.tolist()
        run["alphas"] = [float(a[t]) for t in ts]
        run["sigmas"] = [*map(float, SD15.sigmas()[ts]), 0.0]
    return run


def schedule_vectors() -> dict[str, Any]:
    from sun_edge.sampling import SD15

    return {"about": "sun_edge.sampling.SD15 (scaled-linear betas 0.00085..0.012, 1000 steps): alphas_cumprod and "
                     "sigmas (float64 of the float32 table); per run the integer timesteps, alpha_bar at each, "
                     "DDIM's alpha_bar of the target, DPM-Solver++'s sigmas with the final 0",
            "alphas_cumprod": SD15.alphas_cumprod().tolist(), "sigmas": SD15.sigmas().tolist(),
            "runs": [schedule_run(*r) for r in SCHEDULE_RUNS]}


def analytic_eps(latents: np.ndarray, timestep: np.ndarray) -> np.ndarray:
    """The UNet's stand-in for trajectories: tanh(0.3 x) + (0.01 t / 1000) sin(x), in float64, rounded to float32."""
    x = latents.astype(np.float64)
    c = 0.01 * (float(timestep[0]) / 1000.0)
    return (np.tanh(0.3 * x) + c * np.sin(x)).astype(np.float32)


TRAJECTORY_SEED, TRAJECTORY_SHAPE = 0, (1, 4, 8, 8)
TRAJECTORY_RUNS = [("ddim", "trailing", 4), ("dpmpp_2m", "linspace", 25), ("dpmpp_2m", "trailing", 4)]


def trajectory_vectors() -> dict[str, Any]:
    from sun_edge.noise import initial_noise
    from sun_edge.sampling import sample

    noise = initial_noise(TRAJECTORY_SEED, TRAJECTORY_SHAPE, kind="torch")
    runs = []
    for scheduler, spacing, steps in TRAJECTORY_RUNS:
        calls: list[dict[str, Any]] = []

        def eps_fn(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            calls.append({"timestep": float(t[0]), "input": checksums(x)})
            return analytic_eps(x, t)

        final = sample(eps_fn, noise, steps=steps, scheduler=scheduler, spacing=spacing)
        runs.append({"scheduler": scheduler, "spacing": spacing, "steps": steps, "calls": calls,
                     "final": final.reshape(-1).tolist(), "final_checksums": checksums(final)})
    return {"about": "sun_edge.sampling.sample(analytic_eps, noise, ...) from torch noise of seed 0; calls: the "
                     "timestep and checksums of each model input; final: the returned latents (float32)",
            "eps": "float32(tanh(0.3 * x) + (0.01 * (t / 1000)) * sin(x)), x and t in float64",
            "seed": TRAJECTORY_SEED, "shape": list(TRAJECTORY_SHAPE), "runs": runs}


# ---- text tables for the library ---------------------------------------------------------------------------------


def _ranges(predicate: Any) -> list[list[int]]:
    """Closed code point ranges where ``predicate(chr(c))`` holds, over all of Unicode."""
    out: list[list[int]] = []
    for c in range(0x110000):
        if 0xD800 <= c <= 0xDFFF or not predicate(chr(c)):
            continue
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def text_tables() -> dict[str, Any]:
    """Python's text handling as tables: what the Swift tokenizer's cleanup reads (see TextCleaner.swift)."""
    import ftfy
    import regex
    from ftfy import chardata

    import sun_edge.tokenizer as tokenizer

    letters, numbers, space = regex.compile(r"[\p{L}]"), regex.compile(r"[\p{N}]"), regex.compile(r"\s")
    sloppy = [bytes([b]).decode("sloppy-windows-1252") for b in range(256)]
    lower = {}
    for c in range(0x110000):
        if 0xD800 <= c <= 0xDFFF or c == 0x03A3:  # capital sigma: context-dependent, handled in Swift
            continue
        low = chr(c).lower()
        if low != chr(c):
            lower[str(c)] = low
    assert tokenizer._PATTERN == (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                  r"""[^\s\p{L}\p{N}]+"""), "the tokenizer's regex changed: update TextCleaner.split"
    return {
        "about": "generated by scripts/make_swift_vectors.py from the modules sun-edge's tokenizer uses; do not edit",
        "python": sys.version.split()[0], "ftfy": ftfy.__version__, "regex": regex.__version__,
        "unicodedata": unicodedata.unidata_version,
        "html5": dict(html.entities.html5),
        "ftfy_entities": dict(chardata.HTML_ENTITIES),
        "html_invalid_charrefs": {str(k): v for k, v in html._invalid_charrefs.items()},  # type: ignore[attr-defined]
        "html_invalid_codepoints": sorted(html._invalid_codepoints),  # type: ignore[attr-defined]
        "ligatures": {str(k): v for k, v in chardata.LIGATURES.items()},
        "width_map": {str(k): v for k, v in chardata.WIDTH_MAP.items()},
        "control_chars": sorted(chardata.CONTROL_CHARS),
        "sloppy_windows_1252": sloppy,
        "lowercase": lower,
        "python_space": _ranges(str.isspace),
        "regex_space": _ranges(lambda ch: space.match(ch) is not None),
        "regex_letters": _ranges(lambda ch: letters.match(ch) is not None),
        "regex_numbers": _ranges(lambda ch: numbers.match(ch) is not None),
    }


# ---- the tiny bundle and the end-to-end reference ----------------------------------------------------------------

REFERENCE_PROMPT = "a photo of an astronaut riding a horse on the moon, detailed, sharp focus"
REFERENCE_NEGATIVE = "blurry, lowres, watermark, text"
REFERENCE_SEED = 0


def export_tiny_bundle(out: Path) -> Path:
    """``sun-edge export --model tiny-random --target coreml`` at 64x64 (parity through the MIL evaluator)."""
    subprocess.run([sys.executable, "-m", "sun_edge.cli", "export", "--model", "tiny-random", "--target", "coreml",
                    "--height", str(TINY_SIZE), "--width", str(TINY_SIZE), "-o", str(out)], check=True)
    return out


def reference_vectors(manifest: dict[str, Any], tokenizer: Any = None) -> tuple[dict[str, Any], bytes]:
    """The image the PyTorch reference of the manifest's model makes, as ``sun-edge generate`` makes it.

    The reference is the float32 PyTorch model (not the bundle): the Swift end-to-end test then measures the
    Core ML bundle against the same reference and threshold as ``sun-edge parity`` does. ``tokenizer``: the
    bundle's (default: sun-edge's packaged files, which exports copy).
    """
    from sun_edge.bundle import Manifest
    from sun_edge.pipeline import Pipeline, Settings
    from sun_edge.runtimes.pytorch import TorchRuntime
    from sun_edge.tokenizer import CLIPTokenizer

    m = Manifest.from_dict(manifest)
    runtime = TorchRuntime.load(m.model["name"])
    if m.model.get("sha256") and runtime.info.get("model_sha256") not in (None, m.model["sha256"]):
        raise SystemExit(f"the installed {m.model['name']} is not the model the bundle was exported from "
                         f"(sha256 {runtime.info.get('model_sha256')} vs {m.model['sha256']})")
    settings = Settings(steps=m.scheduler["steps"], scheduler=m.scheduler["name"], spacing=m.scheduler["spacing"],
                        height=m.image["height"], width=m.image["width"], noise="torch")
    recording = _RecordingDecoder(runtime)
    pipe = Pipeline(recording, tokenizer or CLIPTokenizer.default())
    generated = pipe.generate(REFERENCE_PROMPT, REFERENCE_NEGATIVE, seeds=(REFERENCE_SEED,), settings=settings)[0]
    captured = recording.captured
    pixels = np.asarray(generated.image.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    png = io.BytesIO()
    generated.image.save(png, format="PNG")
    image_parity = m.parity.get("components", {}).get("image", {})
    tok = pipe.tokenizer
    return {
        "about": "the end-to-end reference: sun_edge.Pipeline on the PyTorch float32 reference runtime of the bundle's "
                 "model, as `sun-edge generate --model tiny-random` runs it; the Swift test compares the Core ML "
                 "bundle's image with it by PSNR (peak from the reference, pixels mapped to [-1, 1]) against the "
                 "bundle's image parity threshold",
        "reference": "pytorch float32 (sun_edge.runtimes.pytorch.TorchRuntime)",
        "model": m.model.get("name"), "model_sha256": m.model.get("sha256"),
        "prompt": REFERENCE_PROMPT, "negative_prompt": REFERENCE_NEGATIVE, "seed": REFERENCE_SEED,
        "height": settings.height, "width": settings.width, "scheduler": settings.scheduler,
        "spacing": settings.spacing, "steps": settings.steps, "noise": settings.noise,
        "ids": {"prompt": [int(i) for i in tok.encode(REFERENCE_PROMPT)[0]],
                "negative_prompt": [int(i) for i in tok.encode(REFERENCE_NEGATIVE)[0]]},
        "threshold_db": image_parity.get("threshold_db", 30.0),
        "export_parity_db": image_parity.get("psnr_db"),
        "export_parity_candidate": m.parity.get("candidate"),
        "latents": captured["latents"].reshape(-1).astype(np.float32).tolist(),
        "decoded_checksums": checksums(captured["decoded"]),
        "pixels_rgb_base64": base64.b64encode(pixels.tobytes()).decode("ascii"),
        "image_file": "reference.png",
    }, png.getvalue()


class _RecordingDecoder:
    """A runtime that is ``runtime`` but keeps the latents it decodes and the decoded image."""

    def __init__(self, runtime: Any) -> None:
        self._runtime, self.captured = runtime, {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        decoded = self._runtime.decode(latents)
        self.captured.update(latents=latents, decoded=decoded)
        return decoded


# ---- writing -----------------------------------------------------------------------------------------------------

VECTOR_FILES = ("tokens.json", "noise.json", "schedules.json", "trajectories.json")  # bundle-free
BUNDLE_FILES = ("tiny_manifest.json", "reference.json", "reference.png")


def dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


def bundle_free_vectors() -> dict[str, Any]:
    return {"tokens.json": token_vectors(), "noise.json": noise_vectors(), "schedules.json": schedule_vectors(),
            "trajectories.json": trajectory_vectors()}


def bundle_reference(bundle: Path) -> tuple[dict[str, Any], bytes]:
    """``reference_vectors`` for an exported bundle (checked as a runtime opens it), with its tokenizer files."""
    from sun_edge.bundle import open_bundle
    from sun_edge.tokenizer import CLIPTokenizer

    open_bundle(bundle)
    return reference_vectors(json.loads((bundle / "manifest.json").read_text()), CLIPTokenizer.from_dir(bundle))


def write_bundle_files(bundle: Path, out: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    (out / "tiny_manifest.json").write_text(dumps(manifest))
    reference, png = bundle_reference(bundle)
    (out / "reference.json").write_text(dumps(reference))
    (out / "reference.png").write_bytes(png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=VECTORS_DIR, help="test vectors folder")
    parser.add_argument("--tables", type=Path, default=TABLES_FILE, help="clip_text_tables.json path")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--bundle", type=Path, help="an exported tiny Core ML bundle: its manifest and reference")
    group.add_argument("--export", action="store_true", help="export the tiny Core ML bundle first (sun-edge export)")
    parser.add_argument("--reference-only", type=Path, metavar="JSON",
                        help="write only the end-to-end reference of --bundle to JSON (the macOS workflow)")
    args = parser.parse_args(argv)
    if args.reference_only:
        if args.bundle is None:
            parser.error("--reference-only needs --bundle")
        reference, _ = bundle_reference(args.bundle)
        args.reference_only.write_text(dumps(reference))
        print(f"wrote {args.reference_only}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in bundle_free_vectors().items():
        (args.out / name).write_text(dumps(data))
    args.tables.parent.mkdir(parents=True, exist_ok=True)
    args.tables.write_text(json.dumps(text_tables(), ensure_ascii=False, separators=(",", ":")) + "\n")
    if args.export:
        with tempfile.TemporaryDirectory() as tmp:
            write_bundle_files(export_tiny_bundle(Path(tmp) / "tiny-coreml"), args.out)
    elif args.bundle is not None:
        write_bundle_files(args.bundle, args.out)
    print(f"wrote {args.out} and {args.tables}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
