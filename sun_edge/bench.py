"""Benchmark one runtime: UNet steps and whole images, SUN against the CFG baseline, side by side.

Everything is measured in one process and interleaved repeat by repeat (each repeat runs every
form once, in the same order), so all forms see the same machine state; each form gets one
untimed warm-up call first. Figures are medians over the repeats; ratios are computed from them.
Several runtimes (``run_bench_many``: ONNX Runtime beside OpenVINO on one bundle) are timed the same
way in one process, each form on each runtime in turn, and reported side by side with each
runtime's speedup over the first.

Step forms, on real inputs (the tokenized prompts, the initial noise of a seed, t = 999):
``text_encode`` (batch 1), ``unet_sun_b1`` (SUN, adapter inside, batch 1), ``unet_plain_b1``
(the same UNet without the adapter, batch 1), ``unet_cfg_b2`` (without the adapter, the CFG
batch of 2), ``vae_decode`` (the full VAE) and ``vae_decode_tiny`` (TAESD, when loaded).

Whole images (wall time of ``Pipeline.generate``: text encoding, sampling, decoding, to pixels):
``sun4`` (SUN, 4 DDIM steps, full VAE), ``cfg25`` (``Settings.baseline()``: 25 DPM-Solver++ steps,
CFG 8, full VAE) and ``sun4_tiny`` (SUN 4 steps with TAESD, when loaded).

Batch sizes (``batches``, e.g. 1 4 8): at each size B above 1 the SUN step ``unet_sun_bB`` (B seeds
in one call), the CFG step ``unet_cfg_b2B`` (its pair of B) and the images ``sun4_bB``/``cfg25_bB``
(``Pipeline.generate`` of B seeds sharing every UNet call) join the forms, interleaved with the rest.
``BenchResult.throughput()`` turns them into images per second per batch size (whole images, and
UNet time alone from the steps), SUN's over CFG's, and each batch size's over batch 1's. A batch
above the runtime's ``max_batch`` (a bundle's batch range) is refused before anything runs.
``only``: fnmatch patterns naming the forms to time (``unet_*``, ``sun4*``), so a full-size run can
skip what it does not need.

``low_memory``: each runtime holds only the graphs of the form being timed; the others are released
before it runs (``Runtime.release``) and loaded again, with an untimed warm-up call, when a later form
needs them. Peak memory is then that of the largest form on all runtimes together instead of every
graph of every runtime (a full-size ONNX Runtime fp32 bundle holds 12-15 GB for the steps alone), at
the cost of reloading graphs between forms (untimed). The figures are measured as before: each form
still runs warm, interleaved with the same forms on the other runtimes, repeat by repeat. But a form timed just
after its graphs reloaded ran 1-1.4 s (up to 25%) slower than held at full size on a 24 GB machine, even after
its warm-up call, while a form sharing the previous form's graphs did not (docs/measurements.md, "Batch 4 at
full size"): read ratios between forms that reload alike (SUN and CFG at the same batch above 1), not across.

Memory: the process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) when the
benchmark starts (after the caller loaded the runtime), after the warm-up (every graph has run
once: runtimes that open sessions lazily have loaded them by then; with ``low_memory``, after the
first repeat) and at the end: a high-water mark of the whole process (Python, libraries, weights,
activations), so each includes the one before.
NumPy only: the runtime brings its own library.
"""

from __future__ import annotations

import fnmatch
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from sun_edge.errors import SunEdgeError
from sun_edge.components import COMPONENTS, Runtime
from sun_edge.parity import DEFAULT_NEGATIVE, DEFAULT_PROMPT
from sun_edge.pipeline import Pipeline, Settings

RATIOS = MappingProxyType({  # name: (numerator, denominator, what it says), all medians
    "sun_over_plain": ("unet_sun_b1", "unet_plain_b1", "SUN step / plain batch-1 step"),
    "cfg_batch2_over_plain": ("unet_cfg_b2", "unet_plain_b1", "CFG batch-2 step / plain batch-1 step"),
    "end_to_end_cfg25_over_sun4": ("cfg25", "sun4", "image time, CFG 25 steps / SUN 4 steps"),
    "decode_share_of_sun4": ("vae_decode", "sun4", "VAE decode / SUN 4-step image"),
    "end_to_end_cfg25_full_over_sun4_tiny": ("cfg25", "sun4_tiny", "image time, CFG 25 + VAE / SUN 4 + TAESD"),
    "tiny_decode_speedup": ("vae_decode", "vae_decode_tiny", "VAE decode / TAESD decode"),
})


def step_forms(batch: int) -> tuple[str, str]:
    """The SUN and CFG step forms for ``batch`` images: ``unet_sun_bB`` and ``unet_cfg_b2B`` (the CFG pair)."""
    return f"unet_sun_b{batch}", f"unet_cfg_b{2 * batch}"


def image_forms(batch: int) -> tuple[str, str]:
    """The SUN 4 and CFG 25 image forms for ``batch`` images: ``sun4``/``cfg25`` at 1, ``sun4_bB``/``cfg25_bB`` above."""
    return ("sun4", "cfg25") if batch == 1 else (f"sun4_b{batch}", f"cfg25_b{batch}")


def check_batches(batches: Sequence[int], runtimes: Sequence[Runtime]) -> tuple[int, ...]:
    """Distinct positive batch sizes, ascending; a size above a runtime's ``max_batch`` is refused (one line)."""
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise SunEdgeError(f"--batch takes positive whole numbers, got {' '.join(map(str, batches)) or 'none'}")
    sizes = tuple(sorted(set(batches)))
    for runtime in runtimes:
        if sizes[-1] > runtime.max_batch:
            bundle = getattr(runtime, "bundle", None)
            where = f"bundle {bundle.path}" if bundle is not None else f"runtime {runtime.name}"
            raise SunEdgeError(f"--batch {sizes[-1]}: {where} takes at most {runtime.max_batch} image(s) per UNet call "
                               f"(its batch range); give --batch up to {runtime.max_batch}, or re-export with "
                               f"--max-batch {sizes[-1]}")
    return sizes


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def gpu_peak_mib() -> float | None:
    """Peak memory PyTorch's CUDA allocator handed out in this process, in MiB; None without CUDA in use."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def machine_info() -> dict[str, Any]:
    """CPU count, platform, and the versions/threads of the inference libraries already loaded."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "machine": platform.machine(), "python": platform.python_version()}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    if "onnxruntime" in sys.modules:
        info["onnxruntime"] = sys.modules["onnxruntime"].__version__
    return info


class _WithDecoder:
    """A runtime seen through a chosen decoder: what ``Pipeline`` calls ``decode``."""

    def __init__(self, runtime: Any, decode: Callable[[np.ndarray], np.ndarray]) -> None:
        self._runtime, self.decode = runtime, decode

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)


@dataclass(frozen=True)
class BenchResult:
    """Per-repeat seconds of every form, UNet calls per image, and where it ran."""

    seconds: dict[str, list[float]]  # form -> one figure per repeat
    unet_calls: dict[str, int]  # image form -> UNet calls per image
    steps: dict[str, int]  # image form -> sampling steps
    info: dict[str, Any]  # runtime, size, repeats, machine, memory

    def medians(self) -> dict[str, float]:
        return {form: statistics.median(v) for form, v in self.seconds.items()}

    def ratios(self) -> dict[str, float]:
        """Ratios of medians; those whose forms were not measured are left out."""
        med = self.medians()
        out = {}
        for name, (a, b, _) in RATIOS.items():
            if a in med and b in med:
                out[name] = med[a] / med[b]
            if name == "cfg_batch2_over_plain" and "unet_cfg_b2" in med and "unet_sun_b1" in med:
                cfg, sun = Settings.baseline().steps, Settings().steps  # 25 batch-2 calls against 4 SUN calls
                out["unet_time_cfg25_over_sun4"] = cfg * med["unet_cfg_b2"] / (sun * med["unet_sun_b1"])
        for b in self.info.get("batches", (1,)):
            sun_step, cfg_step = step_forms(b)
            if b > 1 and sun_step in med and cfg_step in med:
                cfg, sun = Settings.baseline().steps, Settings().steps
                out[f"unet_time_cfg25_over_sun4_b{b}"] = cfg * med[cfg_step] / (sun * med[sun_step])
        return out

    def throughput(self) -> dict[str, dict[str, float]]:
        """Per batch size (keys "1", "4", ...): images per second and their ratios, from the medians.

        ``sun4_images_per_s``/``cfg25_images_per_s``: whole images (B over the batch's wall time);
        ``unet_sun4_images_per_s``/``unet_cfg25_images_per_s``: UNet time alone (B over 4 SUN steps, over 25
        CFG steps of 2B); ``*_sun4_over_cfg25``: SUN's images per second over CFG's; ``*_over_batch1``: this
        batch size's images per second over batch 1's (when batch 1 was timed). Forms not timed are left out.
        """
        med, out = self.medians(), {}
        sun_steps, cfg_steps = Settings().steps, Settings.baseline().steps
        for b in self.info.get("batches", (1,)):
            (sun_img, cfg_img), (sun_step, cfg_step), row = image_forms(b), step_forms(b), {}
            for key, form, per in (("sun4_images_per_s", sun_img, 1), ("cfg25_images_per_s", cfg_img, 1),
                                   ("unet_sun4_images_per_s", sun_step, sun_steps),
                                   ("unet_cfg25_images_per_s", cfg_step, cfg_steps)):
                if form in med:
                    row[key] = b / (per * med[form])
            for prefix in ("", "unet_"):
                if f"{prefix}sun4_images_per_s" in row and f"{prefix}cfg25_images_per_s" in row:
                    row[f"{prefix}sun4_over_cfg25"] = row[f"{prefix}sun4_images_per_s"] / row[f"{prefix}cfg25_images_per_s"]
            out[str(b)] = row
        for b, row in out.items():
            base = out.get("1", {})
            for key in [k for k in row if k.endswith("_images_per_s")]:
                if b != "1" and key in base:
                    row[f"{key[:-len('_images_per_s')]}_over_batch1"] = row[key] / base[key]
        return {b: row for b, row in out.items() if row}

    def throughput_lines(self) -> list[str]:
        """The throughput table: a row per batch size, whole images then UNet time alone ('-': not timed)."""
        tp = self.throughput()
        if not tp:
            return []
        cols = [("SUN4/s", "sun4_images_per_s"), ("CFG25/s", "cfg25_images_per_s"), ("SUN/CFG", "sun4_over_cfg25"),
                ("SUN/b1", "sun4_over_batch1"), ("CFG/b1", "cfg25_over_batch1")]
        cols += [(f"U:{head}", f"unet_{key}") for head, key in cols]
        lines = ["images per second by batch size (SUN4, CFG25: whole images; U: UNet time alone; "
                 "SUN/CFG: SUN's over CFG's; /b1: over batch 1's)",
                 f"{'batch':<7}" + "".join(f"{head:>11}" for head, _ in cols)]
        for b, row in tp.items():
            lines.append(f"{b:<7}" + "".join(f"{row[key]:>11.4g}" if key in row else f"{'-':>11}" for _, key in cols))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {**self.info, "median_seconds": self.medians(), "seconds": self.seconds,
                "unet_calls": self.unet_calls, "steps": self.steps, "ratios": self.ratios(),
                "throughput": self.throughput()}

    def table(self) -> str:
        """Forms with median/min/max seconds, then the ratios and the memory, as plain aligned text."""
        med = self.medians()
        lines = [f"{self.info['runtime']} at {self.info['height']}x{self.info['width']}, "
                 f"{self.info['repeats']} repeat(s), median after one warm-up",
                 f"{'form':<16}{'median s':>10}{'min s':>10}{'max s':>10}  note"]
        images = {form: b for b in self.info.get("batches", (1,)) for form in image_forms(b)}
        for form, values in self.seconds.items():
            note = f"{self.unet_calls[form]} UNet calls" if form in self.unet_calls else "per call"
            if images.get(form, 1) > 1:
                note += f" for {images[form]} images"
            lines.append(f"{form:<16}{med[form]:>10.4f}{min(values):>10.4f}{max(values):>10.4f}  {note}")
        labels = {name: what for name, (_, _, what) in RATIOS.items()}
        labels["unet_time_cfg25_over_sun4"] = "UNet time, CFG 25 steps / SUN 4 steps"
        for name, value in self.ratios().items():
            label = labels.get(name) or f"UNet time, CFG 25 / SUN 4, batch {name.rsplit('_b', 1)[1]}"
            lines.append(f"{label:<44}{value:>8.3f}  ({name})")
        lines += self.throughput_lines()
        memory = self.info["memory"]
        lines.append(f"peak RSS {memory['peak_rss_mib_after_load']:.0f} MiB after loading, "
                     f"{memory['peak_rss_mib_after_warmup']:.0f} MiB after one call of each form, "
                     f"{memory['peak_rss_mib_after_runs']:.0f} MiB after the runs (whole process)")
        if memory.get("gpu_peak_mib") is not None:
            lines.append(f"GPU: {self.info['machine'].get('gpu')}, peak {memory['gpu_peak_mib']:.0f} MiB allocated by PyTorch")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Forms:
    """One runtime's timed forms, in table order: step callables, image (pipeline, settings, seeds) runs, and
    the calls that warm each form up (a step form itself; an image form the steps of its batch and decoder)."""

    runtime: Any
    steps: dict[str, Callable[[], Any]]
    images: dict[str, tuple[Pipeline, Settings, list[int]]]
    warm: dict[str, tuple[Callable[[], Any], ...]]
    uses: dict[str, frozenset[str]]  # form -> the components (graphs) it runs: what ``low_memory`` keeps loaded


def _forms(runtime: Runtime, *, height: int, width: int, steps_only: bool, seed: int, prompt: str,
           negative_prompt: str, batches: Sequence[int] = (1,)) -> _Forms:
    sun, cfg = Settings(height=height, width=width), Settings.baseline(height=height, width=width)
    sun.validate()
    has_sun = runtime.has("unet")
    plain = runtime.unet_plain if runtime.has("unet_plain") else None
    tiny = runtime.decode_tiny if runtime.has("vae_decoder_tiny") else None
    full = runtime.decode_full
    pipe = Pipeline(runtime)
    ids = pipe.tokenizer.encode(prompt)  # [1, 77]
    pos, neg = pipe.embed(prompt), pipe.embed(negative_prompt)  # [1, 77, D] each
    x = pipe.initial_latents(seed, sun)  # [1, 4, h, w]
    t = np.array([999.0], np.float32)
    steps: dict[str, Callable[[], Any]] = {"text_encode": lambda: runtime.encode_text(ids)}
    images: dict[str, tuple[Pipeline, Settings, list[int]]] = {}
    full_pipe = Pipeline(_WithDecoder(runtime, full), pipe.tokenizer)
    steps["vae_decode"] = lambda: full(x)
    uses = {"text_encode": frozenset({"text_encoder"}), "vae_decode": frozenset({"vae_decoder"})}
    if tiny is not None:
        steps["vae_decode_tiny"] = lambda: tiny(x)
        uses["vae_decode_tiny"] = frozenset({"vae_decoder_tiny"})
    warm: dict[str, tuple[Callable[[], Any], ...]] = {}
    for b in batches:  # B seeds' noise, each seed's own: what Pipeline.generate stacks for a batch of B
        xb = np.concatenate([x] + [pipe.initial_latents(seed + k, sun) for k in range(1, b)])  # [B, 4, h, w]
        pb, nb = np.repeat(pos, b, axis=0), np.repeat(neg, b, axis=0)  # [B, 77, D]
        x2, context = np.concatenate([xb, xb]), np.concatenate([nb, pb])  # [2B, 4, h, w], [2B, 77, D]
        sun_step, cfg_step = step_forms(b)
        if has_sun:
            steps[sun_step] = lambda xb=xb, pb=pb, nb=nb: runtime.unet(xb, t, pb, nb)
            uses[sun_step] = frozenset({"unet"})
        if plain is not None:
            if b == 1:
                steps["unet_plain_b1"] = lambda: plain(x, t, pos)
                uses["unet_plain_b1"] = frozenset({"unet_plain"})
            steps[cfg_step] = lambda x2=x2, context=context: plain(x2, t, context)
            uses[cfg_step] = frozenset({"unet_plain"})
        sun_image, cfg_image = image_forms(b)
        seeds = [seed + k for k in range(b)]
        if not steps_only and has_sun:
            images[sun_image] = (full_pipe, sun, seeds)
            warm[sun_image] = (steps[sun_step], steps["text_encode"], steps["vae_decode"])
            uses[sun_image] = uses[sun_step] | uses["text_encode"] | uses["vae_decode"]
        if not steps_only and plain is not None:
            images[cfg_image] = (full_pipe, cfg, seeds)
            warm[cfg_image] = (steps[cfg_step], steps["text_encode"], steps["vae_decode"])
            uses[cfg_image] = uses[cfg_step] | uses["text_encode"] | uses["vae_decode"]
    if tiny is not None and not steps_only and has_sun and 1 in batches:
        images["sun4_tiny"] = (Pipeline(_WithDecoder(runtime, tiny), pipe.tokenizer), sun, [seed])
        warm["sun4_tiny"] = (steps["unet_sun_b1"], steps["text_encode"], steps["vae_decode_tiny"])
        uses["sun4_tiny"] = uses["unet_sun_b1"] | uses["text_encode"] | uses["vae_decode_tiny"]
    order = ["text_encode", *[k for k in steps if k.startswith("unet_")], "vae_decode", "vae_decode_tiny"]
    steps = {k: steps[k] for k in order if k in steps}
    warm.update({k: (fn,) for k, fn in steps.items()})
    return _Forms(runtime, steps, images, warm, uses)


def _select(all_forms: list[_Forms], only: Sequence[str] | None) -> list[_Forms]:
    """Keep the forms an ``only`` pattern (fnmatch) names; a pattern that names none is refused."""
    if not only:
        return all_forms
    names = list(dict.fromkeys(f for forms in all_forms for f in [*forms.steps, *forms.images]))
    for pattern in only:
        if not fnmatch.filter(names, pattern):
            raise SunEdgeError(f"--only {pattern} names none of the forms timed here: {', '.join(names)}")

    def keep(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in only)

    return [_Forms(f.runtime, {k: v for k, v in f.steps.items() if keep(k)},
                   {k: v for k, v in f.images.items() if keep(k)}, f.warm, f.uses) for f in all_forms]


class _Holder:
    """``low_memory``: which of one runtime's graphs are loaded, and which forms have run warm since they loaded."""

    def __init__(self, forms: _Forms) -> None:
        self.forms = forms
        self.held: set[str] = set(COMPONENTS)  # unknown at first: whatever the caller loaded is released
        self.warmed: set[str] = set()

    def prepare(self, form: str) -> None:
        """Release the graphs ``form`` does not run; warm it (untimed, loading what it needs) if not warm."""
        needed = self.forms.uses[form]
        drop = self.held - needed
        for component in sorted(drop):
            self.forms.runtime.release(component)
        if drop:
            self.held &= needed
            self.warmed = {f for f in self.warmed if self.forms.uses[f] <= self.held}
        if form not in self.warmed:
            for fn in self.forms.warm[form]:
                fn()
            self.warmed.add(form)
            self.held |= needed


def _measure(all_forms: list[_Forms], *, repeats: int, prompt: str, negative_prompt: str,
             low_memory: bool = False) -> tuple[list[dict[str, list[float]]], list[dict[str, int]], float]:
    """Warm every step form of every runtime once, then time each form on each runtime in turn, repeat by repeat.

    The warm-up calls every graph (at every shape) the chosen forms use once, untimed, which also opens lazy sessions.
    ``low_memory``: no warm-up of everything first; each form is warmed when its graphs (re)load (module docstring).
    """
    holders = [_Holder(forms) for forms in all_forms] if low_memory else None
    if holders is None:
        for forms in all_forms:
            calls_once = {id(fn): fn for form in [*forms.steps, *forms.images] for fn in forms.warm[form]}
            for fn in calls_once.values():
                fn()
    rss_warm = peak_rss_mib()
    seconds = [{form: [] for form in [*f.steps, *f.images]} for f in all_forms]
    calls: list[dict[str, int]] = [{} for _ in all_forms]
    order = list(dict.fromkeys(form for f in all_forms for form in [*f.steps, *f.images]))
    for repeat in range(repeats):
        for form in order:
            for k, (forms, secs, n) in enumerate(zip(all_forms, seconds, calls)):
                if holders is not None and form in forms.uses:
                    holders[k].prepare(form)
                if form in forms.steps:
                    start = time.perf_counter()
                    forms.steps[form]()
                    secs[form].append(time.perf_counter() - start)
                elif form in forms.images:
                    image_pipe, settings, seeds = forms.images[form]
                    start = time.perf_counter()
                    result = image_pipe.generate(prompt, negative_prompt, seeds=seeds, settings=settings,
                                                 max_batch=len(seeds))
                    secs[form].append(time.perf_counter() - start)
                    n[form] = result[0].unet_calls
        if holders is not None and repeat == 0:
            rss_warm = peak_rss_mib()
    return seconds, calls, rss_warm


def _about(runtime: Runtime, *, height: int, width: int, repeats: int, seed: int, steps_only: bool,
           info: dict[str, Any] | None, rss_loaded: float, rss_warm: float) -> dict[str, Any]:
    return {"runtime": runtime.name, "model": runtime.info.get("model"),
            "height": height, "width": width, "repeats": repeats, "seed": seed, "steps_only": steps_only,
            **(info or {}), "machine": machine_info(),
            "memory": {"peak_rss_mib_after_load": rss_loaded, "peak_rss_mib_after_warmup": rss_warm,
                       "peak_rss_mib_after_runs": peak_rss_mib(),
                       "gpu_peak_mib": gpu_peak_mib(),
                       "covers": "peak resident set size of the whole process (ru_maxrss): Python, libraries, "
                                 "weights, activations; a high-water mark since the process started"}}


def run_bench(runtime: Runtime, *, repeats: int = 3, height: int = 512, width: int = 512, steps_only: bool = False,
              seed: int = 0, prompt: str = DEFAULT_PROMPT, negative_prompt: str = DEFAULT_NEGATIVE,
              info: dict[str, Any] | None = None, batches: Sequence[int] = (1,),
              only: Sequence[str] | None = None, low_memory: bool = False) -> BenchResult:
    """Time the step forms and (unless ``steps_only``) the whole images, interleaved (module docstring)."""
    return run_bench_many([runtime], repeats=repeats, height=height, width=width, steps_only=steps_only, seed=seed,
                          prompt=prompt, negative_prompt=negative_prompt, infos=[info], batches=batches,
                          only=only, low_memory=low_memory).results[runtime.name]


@dataclass(frozen=True)
class BenchComparison:
    """Several runtimes timed in one process, form by form in turn: each one's figures, and how they compare."""

    results: dict[str, BenchResult]  # runtime name -> its figures, in the order given

    def speedups(self) -> dict[str, dict[str, float]]:
        """Per runtime after the first: form -> first runtime's median / this runtime's (above 1: faster)."""
        names = list(self.results)
        base = self.results[names[0]].medians()
        return {name: {form: base[form] / med for form, med in self.results[name].medians().items() if form in base}
                for name in names[1:]}

    def to_dict(self) -> dict[str, Any]:
        return {"runtimes": list(self.results), "results": {name: r.to_dict() for name, r in self.results.items()},
                "speedup_over_first": self.speedups()}

    def table(self) -> str:
        """One single-runtime table as ``BenchResult.table``; several side by side: medians, speedups, ratios."""
        names = list(self.results)
        if len(names) == 1:
            return self.results[names[0]].table()
        first = self.results[names[0]]
        meds = {name: r.medians() for name, r in self.results.items()}
        speed = self.speedups()
        lines = [f"{' vs '.join(names)} at {first.info['height']}x{first.info['width']}, {first.info['repeats']} "
                 "repeat(s) each, interleaved in one process, medians after one warm-up",
                 f"{'form':<16}" + "".join(f"{n + ' s':>16}" for n in names)
                 + "".join(f"{n + ' speedup':>22}" for n in names[1:])]
        forms = list(dict.fromkeys(form for r in self.results.values() for form in r.seconds))
        for form in forms:
            cells = "".join(f"{meds[n][form]:>16.4f}" if form in meds[n] else f"{'-':>16}" for n in names)
            ups = "".join(f"{speed[n][form]:>21.2f}x" if form in speed[n] else f"{'-':>22}" for n in names[1:])
            lines.append(f"{form:<16}{cells}{ups}")
        labels = {name: what for name, (_, _, what) in RATIOS.items()}
        labels["unet_time_cfg25_over_sun4"] = "UNet time, CFG 25 steps / SUN 4 steps"
        ratios = {n: r.ratios() for n, r in self.results.items()}
        for key in dict.fromkeys(k for r in ratios.values() for k in r):
            cells = "".join(f"{ratios[n][key]:>12.3f}" if key in ratios[n] else f"{'-':>12}" for n in names)
            label = labels.get(key) or f"UNet time, CFG 25 / SUN 4, batch {key.rsplit('_b', 1)[1]}"
            lines.append(f"{label:<44}{cells}  ({key}; {', '.join(names)})")
        for name in names:
            tp = self.results[name].throughput_lines()
            lines += [f"{name}: {tp[0]}", *tp[1:]] if tp else []
        memory = self.results[names[-1]].info["memory"]
        lines.append(f"peak RSS {memory['peak_rss_mib_after_warmup']:.0f} MiB after one call of each form on every "
                     f"runtime, {memory['peak_rss_mib_after_runs']:.0f} MiB after the runs (whole process, all runtimes)")
        return "\n".join(lines)


def run_bench_many(runtimes: Sequence[Runtime], *, repeats: int = 3, height: int = 512, width: int = 512,
                   steps_only: bool = False, seed: int = 0, prompt: str = DEFAULT_PROMPT,
                   negative_prompt: str = DEFAULT_NEGATIVE,
                   infos: Sequence[dict[str, Any] | None] | None = None, batches: Sequence[int] = (1,),
                   only: Sequence[str] | None = None, low_memory: bool = False) -> BenchComparison:
    """Time several runtimes in one process: every form on each runtime in turn, repeat by repeat (module docstring).

    ``infos``: extra fields for each runtime's result (its bundle, options), in the order of ``runtimes``;
    ``batches``: the batch sizes to time SUN 4 and CFG 25 at; ``only``: fnmatch patterns of the forms to time;
    ``low_memory``: hold only the graphs of the form being timed (module docstring).
    """
    if repeats < 1:
        raise SunEdgeError(f"repeats must be at least 1, got {repeats}")
    if not runtimes:
        raise SunEdgeError("bench needs at least one runtime")
    names = [r.name for r in runtimes]
    if len(set(names)) != len(names):
        raise SunEdgeError(f"bench compares distinct runtimes; given: {', '.join(names)}")
    infos = list(infos) if infos is not None else [None] * len(runtimes)
    if len(infos) != len(runtimes):
        raise SunEdgeError(f"bench got {len(infos)} info records for {len(runtimes)} runtimes")
    sizes = check_batches(batches, runtimes)
    rss_loaded = peak_rss_mib()
    all_forms = _select([_forms(r, height=height, width=width, steps_only=steps_only, seed=seed, prompt=prompt,
                                negative_prompt=negative_prompt, batches=sizes) for r in runtimes], only)
    seconds, calls, rss_warm = _measure(all_forms, repeats=repeats, prompt=prompt, negative_prompt=negative_prompt,
                                        low_memory=low_memory)
    results = {}
    for runtime, forms, secs, n, info in zip(runtimes, all_forms, seconds, calls, infos):
        about = _about(runtime, height=height, width=width, repeats=repeats, seed=seed, steps_only=steps_only,
                       info=info, rss_loaded=rss_loaded, rss_warm=rss_warm)
        about.update(batches=list(sizes), only=list(only) if only else None, low_memory=low_memory)
        results[runtime.name] = BenchResult(secs, n, {form: st.steps for form, (_, st, _) in forms.images.items()},
                                            about)
    return BenchComparison(results)
