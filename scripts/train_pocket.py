"""Retrain the Pocket SD family from scratch, stage by stage, into OUT_DIR.

    python scripts/train_pocket.py OUT_DIR [--device cpu|cuda] [--plan cpu|gpu] [--precision fp32|bf16]
                                   [--stages data vae base toon classifier sun sun-p0 sun-p0.25]
                                   [--time-box STAGE=SECONDS ...] [--no-cuda-graph] [--quick]
                                   [--threads N] [--scale X] [--save-precision fp16|fp32]
                                   [--base MODEL | --base-init MODEL] [--adapter-steps N] [--adapter-batch B]
                                   [--adapter-lr LR]
                                   [--adapter-negatives attributes|colours] [--adapter-caption-drop D]

scripts/train_pocket_gpu.sh runs the GPU plan the shipped family came from (toon and the three
adapters side by side); docs/pocket.md says how the shipped weights were made.

On a CPU shared with other work, ``--threads 1`` is several times faster than PyTorch's default
(its OpenMP threads spin against the other processes).

Stages, in order, each writing one output under OUT_DIR and skipped when it already exists
(so an interrupted run resumes stage by stage; delete an output to redo its stage):

    data        data/plain/, data/toon/   world.write_dataset (PNG + .txt pairs)
    vae         vae/                      the autoencoder, scaling_factor calibrated
    base        pocket-base/              text encoder + UNet from scratch (the SD1.5 role)
    toon        pocket-toon/              pocket-base fine-tuned on toon images (a civitai fine-tune)
    decoder     vae-decoder/              the VAE's decoder fine-tuned on both styles, its encoder frozen (the
                                          latent space unchanged); written into pocket-base/ and pocket-toon/
    classifier  classifier.safetensors    the world's attribute classifier (metrics)
    sun         adapters/sun-p0.1.safetensors   SUN adapter on pocket-base, the trainer's
                                          defaults (MSC p = 0.1) at resolution 64; also copied
                                          beside pocket-base and pocket-toon as their adapter
    sun-p0      adapters/sun-p0.safetensors     the same with MSC p = 0    (paper Table 4)
    sun-p0.25   adapters/sun-p0.25.safetensors  the same with MSC p = 0.25 (paper Table 4)

The adapters alone, on the shipped base (the CPU recipe docs/pocket.md records; one adapter stage
resumes exactly from its checkpoints when its output is deleted and ``--adapter-steps`` raised):

    python scripts/train_pocket.py OUT --stages data base --base pocket-base
    python scripts/train_pocket.py OUT --stages sun --adapter-steps 400 --threads 1

More base training on a lent GPU, from the shipped base (scripts/device_pocket_base.sh wraps it for one
device command and packs the result):

    python scripts/train_pocket.py OUT --device cuda --plan gpu --stages data base --base-init pocket-base

Every stage that runs appends one JSON line to OUT_DIR/log.jsonl (stage, output, steps,
batch size, seconds, final loss, ...). ``--quick`` shrinks every stage to seconds: a smoke
test of the whole chain, not a usable model. Runs offline on a CPU or with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

STAGES = ("data", "vae", "base", "toon", "decoder", "classifier", "sun", "sun-p0", "sun-p0.25")
WORLD_SEED = 0  # the training world; the classifier evaluates on world.HELD_OUT-shifted seeds
ADAPTER_P = {"sun": 0.1, "sun-p0": 0.0, "sun-p0.25": 0.25}
# Negatives: 0 or 1 of the world's 26 attribute phrases (world.attribute_negatives: a colour, a shape, a
# size, a count, a background) per training example, so half the examples see the empty negative and
# half one attribute. The paper joins 0..100 of 832 SD phrases; the first shipped adapter drew 0..3 of
# 58 world phrases (most of them colour-shape pairs) and learnt almost no steering (docs/pocket.md).
NEGATIVE_PHRASES = 1
# ``--adapter-negatives``: the pool an adapter stage draws from. ``attributes`` (the default, above); ``colours``,
# the 8 colour words alone, for a continuation that spends the non-empty negatives on what Fig. 5 asks (a
# colour the prompt leaves open); with 0..1 phrases, half the examples still see the empty negative.
NEGATIVE_POOLS = ("attributes", "colours")
# ``--adapter-caption-drop D``: the adapter stage trains on the plain world's images under captions drawn again
# with each optional attribute left out with probability D (the data stage's is 0.25), in data/plain-drop{D}/.
# The images are the same (world.make_example draws the mention before the layout), so only the share of open
# prompts changes: Fig. 5 asks SUN to steer ``a <shape>``, whose colour the prompt leaves open.
# The adapter's AdamW learning rate. The paper's 1e-4 (for SD1.5, batch 32, 5k steps) left the first
# shipped adapter's weights at their initialisation after ~1400 steps (alpha 1.00 +- 0.02, beta
# 0.00 +- 0.02, to_k_neg/to_v_neg std 0.10-0.11 as initialised): this 44k-parameter adapter needs more.
ADAPTER_LR = 1e-3
# The adapter's starting point (sun_edge.pocket.adapter_init): every branch copies its layer's own
# to_k/to_v, alpha 0.5, with the extra-positive branch (as the released SD1.5 adapter has), so that
# at step 0 the adapter is classifier-free guidance written in attention space, 1.5 Zp - 0.5 Zn'.
# Untrained, that already lands nearer the CFG-25 images than the first shipped adapter (16 prompts:
# PSNR 20.3 against 18.3 dB); SUNAdapter.from_unet's random negative branch subtracts noise instead.
ADAPTER_INIT_ALPHA = 0.5
EXTRA_POSITIVE = True


@dataclass(frozen=True)
class Plan:
    """Sizes of every stage: (steps, batch size) pairs and dataset sizes."""

    plain_images: int
    toon_images: int
    vae: tuple[int, int]
    base: tuple[int, int]
    toon: tuple[int, int]
    classifier: tuple[int, int]
    classifier_pool: int
    adapter: tuple[int, int]
    decoder: tuple[int, int] = (3000, 32)  # CPU: 0.53 s a step on 2 cores
    decoder_lr: float = 1e-3
    adapter_lr: float = ADAPTER_LR
    vae_lr: float = 1e-3
    base_lr: float = 1e-3
    toon_lr: float = 2e-4
    base_ema: float = 0.995
    toon_ema: float = 0.99
    warmup: int = 100
    text_encoder_lr: float | None = None  # base stage; None: base_lr


# Sized for about an hour on 2 CPU cores. Measured on a shared 2-core machine with one torch
# thread (seconds per step, wall / process CPU): vae 0.33 / 0.28 at batch 16, base 1.22 / 0.85
# at 32, toon 1.13 / 0.82 at 32, classifier 0.07 (CPU) at 64, SUN adapter 0.74 / 0.66 at 4.
# Estimate (wall, shared, 1 thread): data ~30 s, vae ~510 s, base ~2440 s, toon ~450 s,
# classifier ~70 s, three adapters ~900 s: ~73 min; ~57 min of CPU time on one core.
# That is the recipe in miniature, not enough to learn the prompts: ~64k base samples leave colour
# and background at chance (docs/pocket.md); the shipped family needed ~4M (the GPU plan).
FULL = Plan(plain_images=8000, toon_images=4000, vae=(1500, 16), base=(2000, 32), toon=(400, 32),
            classifier=(600, 64), classifier_pool=8192, adapter=(3000, 8))
# For a lent GPU (H100/H200): larger batches, each stage time-boxed (the log records the steps run).
# Diffusion stages replay one captured CUDA graph per step (train_family._GraphedStep) in fp32 with
# the data on the GPU. Measured on an H200: 0.114 s a step at batch 1024 (the GPU busy; the first,
# eager bf16 run took 0.18 s at batch 128), so base's 455 s are ~4000 steps, ~4M samples, where the
# prompts are learnt (CFG-25 adherence 0.60 at 2M samples, 0.87 at 4M; docs/pocket.md). Toon and the
# three adapters then train side by side on the same GPU (scripts/train_pocket_gpu.sh).
GPU = Plan(plain_images=16000, toon_images=4000, vae=(4000, 256), base=(100000, 1024), toon=(3000, 1024),
           classifier=(600, 64), classifier_pool=8192, adapter=(5000, 64), decoder=(4000, 256), base_ema=0.999,
           toon_ema=0.995)
GPU_SECONDS = {"vae": 60.0, "base": 455.0, "decoder": 60.0, "toon": 80.0, "sun": 150.0, "sun-p0": 150.0,
               "sun-p0.25": 150.0}
QUICK = Plan(plain_images=48, toon_images=24, vae=(3, 4), base=(3, 4), toon=(2, 4), classifier=(3, 8),
             classifier_pool=48, adapter=(1, 1), decoder=(2, 4), warmup=1)


def scaled(plan: Plan, factor: float) -> Plan:
    """``plan`` with every stage's steps times ``factor`` (datasets and batch sizes unchanged)."""
    def times(steps_batch: tuple[int, int]) -> tuple[int, int]:
        return max(1, round(steps_batch[0] * factor)), steps_batch[1]

    return replace(plan, vae=times(plan.vae), base=times(plan.base), toon=times(plan.toon), decoder=times(plan.decoder),
                   classifier=times(plan.classifier), adapter=times(plan.adapter))


def outputs(out: Path) -> dict[str, Path]:
    """Each stage's output path (its existence marks the stage done)."""
    return {"data": out / "data", "vae": out / "vae", "base": out / "pocket-base", "toon": out / "pocket-toon",
            "decoder": out / "vae-decoder",
            "classifier": out / "classifier.safetensors", "sun": out / "adapters" / "sun-p0.1.safetensors",
            "sun-p0": out / "adapters" / "sun-p0.safetensors", "sun-p0.25": out / "adapters" / "sun-p0.25.safetensors"}


def is_done(stage: str, path: Path) -> bool:
    if stage == "data":
        return (path / "plain" / "world.json").is_file() and (path / "toon" / "world.json").is_file()
    if stage in ("vae", "decoder"):
        return (path / "config.json").is_file()
    if stage in ("base", "toon"):
        return (path / "unet" / "config.json").is_file()
    return path.is_file()


def stage_config(steps_batch: tuple[int, int], lr: float, args: argparse.Namespace, plan: Plan, seed: int,
                 stage: str = "") -> Any:
    from sun_edge.pocket.train_family import StageConfig

    steps, batch = steps_batch
    return StageConfig(steps=steps, batch_size=batch, learning_rate=lr, seed=seed, device=args.device,
                       precision=args.precision, warmup_steps=plan.warmup, progress=not args.no_progress,
                       max_seconds=time_box(stage, args), cuda_graph=args.device.startswith("cuda") and args.cuda_graph)


def time_box(stage: str, args: argparse.Namespace) -> float | None:
    """Seconds ``stage`` may train: ``--time-box`` first, then the GPU plan's ``GPU_SECONDS``; else None."""
    boxes = {**(GPU_SECONDS if args.plan == "gpu" else {}), **dict(args.time_box or [])}
    return boxes.get(stage)


def parse_time_box(text: str) -> tuple[str, float]:
    """``STAGE=SECONDS`` -> (stage, seconds), for ``--time-box``."""
    stage, _, seconds = text.partition("=")
    if stage not in STAGES:
        raise argparse.ArgumentTypeError(f"unknown stage {stage!r} in {text!r}; choose from: {', '.join(STAGES)}")
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: write STAGE=SECONDS with SECONDS > 0, e.g. base=240")
    return stage, value


def run_data(out: Path, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor

    from sun_edge.pocket.world import write_dataset

    dst = outputs(out)["data"]
    todo = [(style, n) for style, n in (("plain", plan.plain_images), ("toon", plan.toon_images))
            if not (dst / style / "world.json").is_file()]
    with ProcessPoolExecutor(max_workers=max(1, len(todo))) as pool:  # both styles at once
        jobs = [pool.submit(write_dataset, dst / style, n, seed=WORLD_SEED, style=style, progress=not args.no_progress)
                for style, n in todo]
        for job in jobs:
            job.result()
    return {"plain_images": plan.plain_images, "toon_images": plan.toon_images, "seed": WORLD_SEED}


def run_vae(out: Path, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    from sun_edge.pocket.family import build_components
    from sun_edge.pocket.train_family import ImageCaptions, train_vae

    data = ImageCaptions.from_folder(outputs(out)["data"] / "plain")
    vae = build_components(args.seed)["vae"]
    result = train_vae(vae, data, stage_config(plan.vae, plan.vae_lr, args, plan, args.seed, "vae"))
    _write_vae(vae, outputs(out)["vae"])
    return result.to_json()


def _write_vae(vae: Any, dst: Path) -> None:
    """``vae`` as a diffusers folder at ``dst``, written beside it and renamed into place when complete."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.to("cpu").save_pretrained(tmp, safe_serialization=True)
    for written in tmp.iterdir():
        written.chmod(0o644)  # the weights file comes out private
    tmp.rename(dst)


def _load_vae(folder: Path) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(folder), local_files_only=True).eval().requires_grad_(False)


def run_base(out: Path, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    from sun_edge.pocket.family import build_components, describe, write_model

    if args.base_init is not None:
        return continue_base(out, plan, args)
    if args.base is not None:  # a trained base (e.g. the shipped one): copied, its adapter file left out
        from sun_edge.adapter import BUNDLED_ADAPTER_FILE
        from sun_edge.models import resolve_model

        source = resolve_model(args.base)
        shutil.copytree(source, outputs(out)["base"], ignore=shutil.ignore_patterns(BUNDLED_ADAPTER_FILE))
        return {"copied_from": str(source)}
    from sun_edge.pocket.train_family import ImageCaptions, train_base

    data = ImageCaptions.from_folder(outputs(out)["data"] / "plain")
    components = {**build_components(args.seed), "vae": _load_vae(outputs(out)["vae"])}
    trained, result = train_base(components, data, stage_config(plan.base, plan.base_lr, args, plan, args.seed, "base"),
                                 ema_decay=plan.base_ema, text_encoder_lr=plan.text_encoder_lr)
    info = {"stage": "base", "world_seed": WORLD_SEED, **result.to_json()}
    write_model(trained, outputs(out)["base"], precision=args.save_precision, extra=info)
    print(describe(trained), file=sys.stderr)
    return result.to_json()


def continue_base(out: Path, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """``--base-init MODEL``: the base stage trains on from MODEL's text encoder and UNet (its VAE kept frozen).

    A fresh AdamW (the plan's base learning rate and warm-up) and a fresh EMA that starts at MODEL's weights, on
    the data stage's images; ``pocket.json`` keeps MODEL's record and adds this run to its ``runs`` and
    ``samples``, so the written model says everything it was trained on."""
    from sun_edge.models import resolve_model
    from sun_edge.pocket.family import describe, load_components, read_pocket_info, write_model
    from sun_edge.pocket.train_family import ImageCaptions, train_base

    source = resolve_model(args.base_init)
    before = read_pocket_info(source)
    if before.get("stage", "base") != "base":
        from sun_edge.errors import SunEdgeError

        raise SunEdgeError(f"--base-init {args.base_init}: its pocket.json says stage {before['stage']!r}; "
                           "continue a base model (e.g. pocket-base), not a fine-tune")
    data = ImageCaptions.from_folder(outputs(out)["data"] / "plain")
    components = load_components(source)
    trained, result = train_base(components, data, stage_config(plan.base, plan.base_lr, args, plan, args.seed, "base"),
                                 ema_decay=plan.base_ema, text_encoder_lr=plan.text_encoder_lr)
    run = {"part": f"continued from {source} (a fresh AdamW, seed {args.seed})", "device": device_name(args.device),
           "steps": result.steps, "batch_size": result.batch_size, "seconds": round(result.seconds, 2),
           "final_loss": result.final_loss}
    info = {key: value for key, value in before.items() if key != "adapter"}  # the adapter file is not copied
    command = "python scripts/train_pocket.py " + " ".join(args.command_line)
    info.update({"stage": "base", "world_seed": WORLD_SEED, "continued_from": str(source),
                 "command": f"{before['command']}; then {command}" if "command" in before else command,
                 "runs": [*before.get("runs", []), run],
                 "samples": int(before.get("samples", 0)) + result.steps * result.batch_size,
                 "ema_decay": plan.base_ema, "learning_rate": plan.base_lr})
    write_model(trained, outputs(out)["base"], precision=args.save_precision, extra=info)
    print(describe(trained), file=sys.stderr)
    return {"continued_from": str(source), "samples_before": int(before.get("samples", 0)), **result.to_json()}


def device_name(device: str) -> str:
    """What trained: the GPU's name and torch's version for CUDA, else the device string."""
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return f"{device}, torch {torch.__version__}"


def run_toon(out: Path, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    from sun_edge.pocket.family import load_components, write_model
    from sun_edge.pocket.train_family import ImageCaptions, finetune_toon

    data = ImageCaptions.from_folder(outputs(out)["data"] / "toon")
    base = load_components(outputs(out)["base"])
    trained, result = finetune_toon(base, data, stage_config(plan.toon, plan.toon_lr, args, plan, args.seed + 1, "toon"),
                                    ema_decay=plan.toon_ema)
    info = {"stage": "toon", "from": "pocket-base", "world_seed": WORLD_SEED, **result.to_json()}
    write_model(trained, outputs(out)["toon"], precision=args.save_precision, extra=info)
    return result.to_json()


def run_decoder(out: Path, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """The VAE of this run's pocket-base with its decoder fine-tuned (``train_family.finetune_vae_decoder``) on the
    plain and toon images; written to ``vae-decoder/`` and then as the ``vae/`` of pocket-base and pocket-toon
    (where this run has them), each model's ``pocket.json`` saying so."""
    import torch

    from sun_edge.errors import SunEdgeError
    from sun_edge.pocket.family import read_pocket_info
    from sun_edge.pocket.train_family import ImageCaptions, finetune_vae_decoder

    base = outputs(out)["base"]
    if not is_done("base", base):
        raise SunEdgeError(f"no pocket-base in {out}: run the base stage first (or --stages base --base pocket-base)")
    vae = _load_vae(base / "vae").float()
    plain = ImageCaptions.from_folder(outputs(out)["data"] / "plain")
    toon = ImageCaptions.from_folder(outputs(out)["data"] / "toon")
    data = ImageCaptions(torch.cat([plain.images, toon.images]), plain.captions + toon.captions)
    result = finetune_vae_decoder(vae, data, stage_config(plan.decoder, plan.decoder_lr, args, plan, args.seed + 2,
                                                          "decoder"))
    dst = outputs(out)["decoder"]
    _write_vae(vae.half() if args.save_precision == "fp16" else vae, dst)
    record = {"from": str(base / "vae"), "plain_images": len(plain), "toon_images": len(toon), **result.to_json()}
    for model in (outputs(out)["base"], outputs(out)["toon"]):
        if not is_done("toon", model):
            continue
        staged, old = model / ".vae.new", model / ".vae.old"
        for leftover in (staged, old):
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.copytree(dst, staged)
        (model / "vae").rename(old)  # the model always has a whole vae/: the old one until the new one is in
        staged.rename(model / "vae")
        shutil.rmtree(old)
        info = read_pocket_info(model)
        info["vae_decoder"] = record
        (model / "pocket.json").write_text(json.dumps(info, indent=2) + "\n")
    return record


def run_classifier(out: Path, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    from sun_edge.pocket.classifier import save_classifier, train_classifier

    steps, batch = plan.classifier
    start = time.perf_counter()
    model = train_classifier(steps=steps, batch_size=batch, seed=args.seed, styles=("plain", "toon"),
                             device=args.device, progress=not args.no_progress, pool=plan.classifier_pool)
    seconds = time.perf_counter() - start
    save_classifier(model.to("cpu"), outputs(out)["classifier"])
    return {"steps": steps, "batch_size": batch, "seconds": round(seconds, 2),
            "seconds_per_step": round(seconds / steps, 4), "pool": plan.classifier_pool}


def run_adapter(stage: str, out: Path, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    from sun_edge.adapter import BUNDLED_ADAPTER_FILE
    from sun_edge.train import TrainConfig, train

    dst = outputs(out)[stage]
    dst.parent.mkdir(parents=True, exist_ok=True)
    steps, batch = plan.adapter
    from sun_edge.pocket.world import COLOURS, attribute_negatives

    colours = args.adapter_negatives == "colours"
    pool = out / ("negative_phrases-colours.txt" if colours else "negative_phrases.txt")  # world words only: the
    tmp = pool.with_name(f".{pool.name}.{os.getpid()}")  # pocket text encoder knows no others; replaced atomically
    tmp.write_text("\n".join(COLOURS if colours else attribute_negatives()) + "\n")  # (stages may run side by side)
    os.replace(tmp, pool)
    if args.adapter_init is not None:  # a fine-tune of a trained adapter (a fresh AdamW)
        init, init_how = args.adapter_init, str(args.adapter_init)
    else:
        init = dst.with_name(f"init-alpha{ADAPTER_INIT_ALPHA:g}.safetensors")  # the same start for every adapter stage
        init_how = f"adapter_from_cross_attention(alpha={ADAPTER_INIT_ALPHA:g}, extra_positive={EXTRA_POSITIVE})"
        if not init.is_file():
            import torch

            from sun_edge.adapter import save_adapter
            from sun_edge.models import load_model
            from sun_edge.pocket.adapter_init import adapter_from_cross_attention

            unet = load_model(str(outputs(out)["base"])).unet
            start = adapter_from_cross_attention(unet, alpha=ADAPTER_INIT_ALPHA, extra_positive=EXTRA_POSITIVE)
            tmp_init = init.with_name(f".{init.name}.{os.getpid()}")
            save_adapter(start, tmp_init, dtype=torch.float32)
            os.replace(tmp_init, init)
    data = outputs(out)["data"] / "plain"
    if args.adapter_caption_drop is not None:
        data = open_caption_data(data, args.adapter_caption_drop, args)
    config = TrainConfig(model=str(outputs(out)["base"]), data=data, output=dst,
                         init_adapter=init, extra_positive=EXTRA_POSITIVE,
                         negative_pool=pool, max_negative_phrases=NEGATIVE_PHRASES,
                         resolution=64, batch_size=batch, max_steps=steps, msc_probability=ADAPTER_P[stage],
                         learning_rate=plan.adapter_lr, checkpoint_every=250,
                         keep_checkpoints=1000,  # ~1 MB each: all kept, to pick from
                         seed=args.seed, cpu=args.device == "cpu", max_seconds=time_box(stage, args),
                         num_workers=0 if args.device == "cpu" else 2,
                         mixed_precision="bf16" if args.precision == "bf16" else "no",
                         progress=not args.no_progress)
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    if stage == "sun":  # the default adapter ships beside the models (SUN's claim: it plugs into fine-tunes)
        for model in ("base", "toon"):
            if is_done(model, outputs(out)[model]):
                shutil.copyfile(dst, outputs(out)[model] / BUNDLED_ADAPTER_FILE)
    tail = [h.loss for h in result.history][-max(1, min(100, len(result.history) // 10)):]  # as the other stages
    last = sum(tail) / len(tail) if tail else float("nan")
    return {"steps": result.steps, "batch_size": batch, "seconds": round(seconds, 2),
            "seconds_per_step": round(sum(h.seconds for h in result.history) / max(1, len(result.history)), 4),
            "final_loss": last,
            "msc_probability": ADAPTER_P[stage], "resolution": 64, "learning_rate": plan.adapter_lr,
            "negatives": f"0..{NEGATIVE_PHRASES} of " + ("world.COLOURS" if colours else "world.attribute_negatives()"),
            "start_step": result.start_step, "data": str(data.relative_to(out)),
            "init": init_how,
            "examples_per_second": result.examples_per_second}


def open_caption_data(plain: Path, drop: float, args: argparse.Namespace) -> Path:
    """``plain``'s images under captions that leave each optional attribute out with probability ``drop``."""
    from sun_edge.pocket.world import write_dataset

    world = json.loads((plain / "world.json").read_text(encoding="utf-8"))
    folder = plain.with_name(f"plain-drop{drop:g}")
    if not (folder / "world.json").is_file():  # write_dataset builds it aside and renames it when complete
        write_dataset(folder, world["n"], seed=world["seed"], style=world["style"], drop=drop,
                      resolution=world["resolution"], progress=not args.no_progress)
    return folder


def run_stage(stage: str, out: Path, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    runners = {"data": run_data, "vae": run_vae, "base": run_base, "toon": run_toon, "decoder": run_decoder,
               "classifier": run_classifier}
    if stage in runners:
        return runners[stage](out, plan, args)
    return run_adapter(stage, out, plan, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (created; existing stage outputs are kept)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype (default: fp32)")
    parser.add_argument("--save-precision", choices=["fp32", "fp16"], default="fp16", help="model weights on disk")
    parser.add_argument("--quick", action="store_true", help="every stage in seconds: a smoke test")
    parser.add_argument("--plan", choices=["cpu", "gpu"], default="cpu",
                        help="cpu: sized for about an hour on 2 cores (default); gpu: larger batches, stages "
                             f"time-boxed to {GPU_SECONDS} seconds")
    parser.add_argument("--time-box", type=parse_time_box, action="append", metavar="STAGE=SECONDS",
                        help="stop STAGE after this many seconds of training (repeatable; overrides the GPU plan's)")
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                        help="with --device cuda: run diffusion steps eagerly instead of replaying a CUDA graph")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), metavar="STAGE",
                        help=f"stages to run, in the fixed order: {' '.join(STAGES)} (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", metavar="MODEL",
                        help="base stage: copy this trained model (name or folder, e.g. pocket-base) instead of training")
    parser.add_argument("--base-init", metavar="MODEL",
                        help="base stage: train on from this trained base (name or folder, e.g. pocket-base) with a "
                             "fresh AdamW instead of from scratch; its pocket.json record is carried on")
    parser.add_argument("--adapter-steps", type=int, metavar="N",
                        help="adapter stages: train to this many steps (a stage resumes from its checkpoints, so "
                             "deleting its output and raising N continues it exactly)")
    parser.add_argument("--adapter-batch", type=int, metavar="B",
                        help="adapter stages: examples per step (default: the plan's, 8 on the CPU); a larger batch "
                             "with a lower --adapter-lr averages out more of the gradient's noise per step")
    parser.add_argument("--adapter-lr", type=float, metavar="LR", help=f"adapter learning rate (default {ADAPTER_LR})")
    parser.add_argument("--adapter-negatives", choices=NEGATIVE_POOLS, default="attributes",
                        help="adapter stages: the negative phrase pool (default attributes: the world's 26 attribute "
                             "phrases; colours: its 8 colours, to continue a run towards Fig. 5)")
    parser.add_argument("--adapter-init", type=Path, metavar="ADAPTER",
                        help="adapter stages: start from this trained adapter file (a fine-tune with a fresh AdamW) "
                             "instead of the layer-copy initialisation")
    parser.add_argument("--adapter-caption-drop", type=float, metavar="D",
                        help="adapter stages: train on captions that leave each optional attribute out with "
                             "probability D (default: the data stage's captions, D = 0.25)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every stage's steps (e.g. 10 on a GPU, where an hour's CPU plan takes minutes)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: PyTorch's; 1 on a shared machine)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # for the records a stage writes

    from sun_edge.errors import SunEdgeError

    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        print(f"error: unknown stage {unknown[0]!r}; choose from: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but PyTorch sees no CUDA GPU; use --device cpu", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = True  # small fp32 models: TF32 convolutions and products
        torch.backends.cudnn.allow_tf32 = True
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.adapter_caption_drop is not None and not 0 <= args.adapter_caption_drop <= 1:
        print(f"error: --adapter-caption-drop must be in [0, 1], got {args.adapter_caption_drop}", file=sys.stderr)
        return 2
    if args.adapter_init is not None and not args.adapter_init.is_file():
        print(f"error: --adapter-init {args.adapter_init} is not a file; give a .safetensors adapter", file=sys.stderr)
        return 2
    if args.base is not None and args.base_init is not None:
        print("error: --base copies a model and --base-init trains on from one; give one of them", file=sys.stderr)
        return 2
    if args.adapter_batch is not None and args.adapter_batch < 1:
        print(f"error: --adapter-batch must be at least 1, got {args.adapter_batch}", file=sys.stderr)
        return 2
    if args.scale <= 0:
        print(f"error: --scale must be positive, got {args.scale}", file=sys.stderr)
        return 2
    plan = scaled(QUICK if args.quick else (GPU if args.plan == "gpu" else FULL), args.scale)
    if args.adapter_steps is not None:
        plan = replace(plan, adapter=(args.adapter_steps, plan.adapter[1]))
    if args.adapter_batch is not None:
        plan = replace(plan, adapter=(plan.adapter[0], args.adapter_batch))
    if args.adapter_lr is not None:
        plan = replace(plan, adapter_lr=args.adapter_lr)
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    times: list[tuple[str, str, float]] = []
    for stage in (s for s in STAGES if s in args.stages):
        path = outputs(out)[stage]
        if is_done(stage, path):
            print(f"[{stage}] skipped: {path} exists", file=sys.stderr)
            times.append((stage, "skipped", 0.0))
            continue
        print(f"[{stage}] -> {path}", file=sys.stderr)
        start = time.perf_counter()
        try:
            record = run_stage(stage, out, plan, args)
        except SunEdgeError as error:
            print(f"error: stage {stage}: {error}", file=sys.stderr)
            return 2
        seconds = time.perf_counter() - start
        line = {"stage": stage, "output": str(path.relative_to(out)), "quick": args.quick, "device": args.device,
                "precision": args.precision, "total_seconds": round(seconds, 2), **record}
        with open(out / "log.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(line) + "\n")
        times.append((stage, "done", seconds))
        print(f"[{stage}] done in {seconds:.1f} s", file=sys.stderr)
    print("stage        status     seconds")
    for stage, status, seconds in times:
        print(f"{stage:<12} {status:<10} {seconds:8.1f}")
    print(f"{'total':<12} {'':<10} {sum(t for _, _, t in times):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
