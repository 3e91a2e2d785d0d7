"""Run the Pocket SD evaluation (``sun_edge.pocket.eval``) and write its tables, figures and JSON.

``run_eval(EvalRequest(...), out_dir)`` writes into ``out_dir``:

- ``eval.json``: every figure (per attribute, per image PSNR, per colour), the request and the machine;
- ``tables.md``: Table 2, Table 4 and Fig. 5 as Markdown, with the command line that made them;
- ``grid-<model>.png``: the first prompts of Table 2, one row each, one column per method;
- ``negative.png``: Fig. 5's pictures: ``a circle`` with and without the negative ``red``, CFG 25 and SUN 4.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sun_edge import imaging
from sun_edge.errors import SunEdgeError
from sun_edge.pipeline import Pipeline, Settings
from sun_edge.pocket.eval import (
    NegativeSteering,
    Scores,
    generate_images,
    methods,
    negative_steering,
    real_images,
    score,
    table2_prompts,
)

GRID_ROWS = 6


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate. ``models[0]`` is the base the adapters were trained on."""

    models: tuple[str, ...]
    adapter: str | None = None  # default: the adapter shipped beside models[0]
    # Table 4: (label such as "p=0", path); a label given again is another training seed of that setting
    msc_adapters: tuple[tuple[str, str], ...] = ()
    prompts: int = 64  # Table 2 prompts (one seed each)
    negative_seeds: int = 8  # Fig. 5: seeds per shape and condition
    size: int = 64
    classifier: str | None = None  # default: the shipped classifier
    styles: tuple[tuple[str, str], ...] = ()  # (model, world style) for the FD's real images; default by name
    command: str = ""

    def style(self, model: str) -> str:
        return dict(self.styles).get(model, "toon" if "toon" in Path(model).name else "plain")


@dataclass
class EvalReport:
    request: EvalRequest
    table2: dict[str, dict[str, Scores]] = field(default_factory=dict)  # model -> method -> scores
    table4: dict[str, list[Scores]] = field(default_factory=dict)  # label -> SUN-4 scores on models[0], one per adapter
    fig5: dict[str, NegativeSteering] = field(default_factory=dict)  # "cfg25" / "sun4" -> steering
    labels: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"request": asdict(self.request), "seconds": self.seconds, "machine": platform.platform(),
                "methods": self.labels,
                "table2": {m: {k: s.to_dict() for k, s in v.items()} for m, v in self.table2.items()},
                "table4": {k: [s.to_dict() for s in v] for k, v in self.table4.items()},
                "table4_spread": {k: spread(v) for k, v in self.table4.items() if len(v) > 1},
                "fig5": {k: v.to_dict() for k, v in self.fig5.items()}}

    def markdown(self) -> str:
        req = self.request
        out = [f"Command: `{req.command}`" if req.command else "", "",
               f"### Table 2: 4-step samplers against the 25-step reference ({req.prompts} prompts, one seed each, "
               f"{req.size}x{req.size})", "",
               "| model | method | adherence (mean) | colour read back | all attributes right "
               "| FD to the reference (paper's metric) | FD to world images | PSNR vs reference (dB) |",
               "|---|---|---|---|---|---|---|---|"]
        for model, rows in self.table2.items():
            for name, s in rows.items():
                out.append(f"| {model} | {self.labels[name]} | {_row(s)} |")
        if self.table4:
            out += ["", f"### Table 4: MSC probability p (SUN 4 steps on {req.models[0]})", "",
                    "| adapter | adherence (mean) | colour read back | all attributes right | FD to the reference "
                    "| FD to world images | PSNR vs reference (dB) |", "|---|---|---|---|---|---|---|"]
            table2_sun = self.table2.get(req.models[0], {}).get("sun4")
            if table2_sun is not None:
                out.append(f"| {req.adapter or 'the adapter beside the model'} (Table 2's) | {_row(table2_sun)} |")
            for label, runs in self.table4.items():
                if len(runs) == 1:
                    out.append(f"| {label} | {_row(runs[0])} |")
                    continue
                out += [f"| {label}, run {k + 1} of {len(runs)} | {_row(s)} |" for k, s in enumerate(runs)]
                cells = " | ".join(f"**{m:.3f} ± {sd:.3f}**" if key.startswith("adherence") else f"**{m:.2f} ± {sd:.2f}**"
                                   for key, (m, sd) in spread(runs).items())
                out.append(f"| {label}: mean ± s.d. over its {len(runs)} runs | {cells} |")
            if any(len(runs) > 1 for runs in self.table4.values()):
                out += ["", "A label given several times is the same setting trained with different seeds (different "
                        "draws of examples, noise, timesteps and MSC choices, from the same start), one run each in "
                        "the order given (the command above names their files); its last row is "
                        "the mean and sample s.d. over those adapters, the spread to read a difference between "
                        "settings against."]
        if self.fig5:
            out += ["", f"### Fig. 5: negative prompts steer SUN (prompt `a <shape>`, {req.negative_seeds} seeds per "
                    f"shape, on {req.models[0]})", "",
                    "Share of images the classifier reads as colour C, without a negative prompt and with C as the "
                    "negative prompt (an image that shows no shape is in no colour); fall: 1 - mean with / mean "
                    "without (± its s.d. over bootstrap resamples of the images).", "",
                    "| method | " + " | ".join(next(iter(self.fig5.values())).without) + " | mean | fall |",
                    "|---|" + "---|" * (len(next(iter(self.fig5.values())).without) + 2)]
            for name, steer in self.fig5.items():
                cells = [f"{steer.without[c]:.2f} -> {steer.with_negative[c]:.2f}" for c in steer.without]
                a, b = steer.mean()
                sd = steer.fall_sd()
                fall = f"{steer.fall():.0%}" + (f" ± {sd:.0%}" if sd is not None else "")
                out.append(f"| {self.labels[name]} | " + " | ".join(cells) + f" | {a:.3f} -> {b:.3f} | {fall} |")
        return "\n".join(out).strip() + "\n"


def spread(runs: list[Scores]) -> dict[str, tuple[float, float]]:
    """Mean and sample s.d. over several adapters of one setting, per Table 4 column, in the table's order."""
    values = {"adherence (mean)": [s.adherence["mean"] for s in runs],
              "adherence (colour)": [s.adherence["colour"] for s in runs],
              "adherence (all)": [s.adherence["all"] for s in runs],
              "fd_reference": [s.fd_reference for s in runs], "fd": [s.fd for s in runs], "psnr": [s.psnr for s in runs]}
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1))) for k, v in values.items()}


def _row(s: Scores) -> str:
    """Adherence, colour, all-right, FD to the reference (± bootstrap s.d.), FD to the world, PSNR (± s.e.)."""
    fd_ref = "reference" if s.fd_reference is None else f"{s.fd_reference:.2f}"
    if s.fd_reference_sd is not None:
        fd_ref += f" ± {s.fd_reference_sd:.1f}"
    psnr = "reference" if s.psnr is None else f"{s.psnr:.2f}"
    if s.psnr is not None and s.psnr_se is not None:
        psnr += f" ± {s.psnr_se:.2f}"
    return (f"{s.adherence['mean']:.3f} | {s.adherence['colour']:.3f} | {s.adherence['all']:.3f} | {fd_ref} "
            f"| {s.fd:.2f} | {psnr}")


def _runtime(model: str, adapter: str | None) -> Any:
    from sun_edge.runtimes.pytorch import TorchRuntime

    runtime = TorchRuntime.load(model, adapter)
    if runtime.adapter is None:
        raise SunEdgeError(f"model {model} has no SUN adapter beside it: pass --adapter PATH")
    return runtime


def run_eval(request: EvalRequest, out_dir: Path, *, progress: bool = True) -> EvalReport:
    """Generate, score and write everything (module docstring). ``out_dir`` is created; files are replaced."""
    from sun_edge.pocket.classifier import DEFAULT_WEIGHTS, extract_features, load_classifier

    if not request.models:
        raise SunEdgeError("give at least one --model")
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(request.classifier or DEFAULT_WEIGHTS)
    table = methods(request.size)
    prompts, scenes, seeds = table2_prompts(request.prompts)
    report = EvalReport(request, labels={k: m.label for k, m in table.items()})
    total = (len(request.models) * len(table) + len(request.msc_adapters)) * len(prompts)
    total += 2 * (1 + 8) * 4 * request.negative_seeds if request.negative_seeds else 0
    bar = tqdm(total=total, desc="eval", unit="image", disable=not progress)
    tick = lambda: bar.update(1)  # noqa: E731

    base_runtime = None
    for model in request.models:
        runtime = _runtime(model, request.adapter)
        base_runtime = base_runtime or runtime
        pipe = Pipeline(runtime)
        real = extract_features(classifier, real_images(scenes, 7, request.style(model), request.size))
        images = {name: generate_images(pipe, prompts, seeds, m.settings, "", tick) for name, m in table.items()}
        ref = images["cfg25"]
        ref_feats = extract_features(classifier, ref)
        report.table2[model] = {name: score(classifier, imgs, scenes, real) if name == "cfg25" else
                                score(classifier, imgs, scenes, real, ref, ref_feats) for name, imgs in images.items()}
        rows = [[images[name][i] for name in table] for i in range(min(GRID_ROWS, len(prompts)))]
        imaging.grid(rows, list(table), [p[:40] for p in prompts[:GRID_ROWS]], scale=2).save(
            out_dir / f"grid-{Path(model).name}.png")
        if model == request.models[0]:
            base_ref, base_ref_feats, base_real = ref, ref_feats, real

    for label, path in request.msc_adapters:
        pipe = Pipeline(_runtime(request.models[0], path))
        imgs = generate_images(pipe, prompts, seeds, table["sun4"].settings, "", tick)
        report.table4.setdefault(label, []).append(score(classifier, imgs, scenes, base_real, base_ref, base_ref_feats))

    if request.negative_seeds:
        pipe = Pipeline(base_runtime)
        for name in ("cfg25", "sun4"):
            report.fig5[name] = negative_steering(pipe, classifier, table[name].settings,
                                                  seeds_per_shape=request.negative_seeds, progress=tick)
        _negative_figure(pipe, table, out_dir / "negative.png")
    bar.close()
    report.seconds = time.perf_counter() - start
    (out_dir / "eval.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (out_dir / "tables.md").write_text(report.markdown())
    return report


def _negative_figure(pipe: Pipeline, table: dict[str, Any], path: Path, shape: str = "circle",
                     colour: str = "red", seeds: int = 8) -> None:
    """Rows: CFG 25 and SUN 4, each without and with the negative prompt; columns: seeds."""
    rows, labels = [], []
    prompts, seed_list = [f"a {shape}"] * seeds, list(range(2000, 2000 + seeds))
    for name in ("cfg25", "sun4"):
        settings: Settings = table[name].settings
        for negative in ("", colour):
            rows.append(list(generate_images(pipe, prompts, seed_list, settings, negative)))
            labels.append(f"{name}, neg: {negative or '(none)'}")
    imaging.grid(rows, [f"seed {s}" for s in seed_list], labels, scale=2).save(path)
