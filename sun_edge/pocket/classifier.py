"""A small CNN that reads a pocket-world image's attributes, and the Fréchet distance on its features.

``AttributeClassifier`` has one head per attribute in ``ATTRIBUTES`` and a 128-wide penultimate
layer (``features``) that plays Inception's role in FID. It is trained on freshly rendered plain
and toon images with light noise, blur and brightness augmentation (and flips and quarter turns,
which change no attribute), so it also reads the imperfect images a small generator makes.

The training world is ``seed``; ``evaluate`` defaults to a held-out world (``seed + HELD_OUT``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sun_edge.errors import SunEdgeError
from sun_edge.pocket.world import ATTRIBUTES, BACKGROUNDS, COLOURS, COUNTS, SHAPES, SIZES, STYLES, scene_batch

VALUES: dict[str, tuple] = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "count": COUNTS,
                            "background": BACKGROUNDS}
FORMAT = "sun-edge-pocket-classifier/1"
RECOMMENDED_STEPS = 600  # at batch 64: >99% on every attribute, plain and toon
HELD_OUT = 7919  # evaluation world = training seed + HELD_OUT
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "data" / "pocket" / "classifier.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    """The network's shape; saved in the weights file's metadata."""

    widths: tuple[int, ...] = (16, 32, 64, 128)  # conv stages; the first has stride 2, the others end in a 2x2 pool
    features: int = 128  # penultimate width, the Fréchet features
    resolution: int = 64


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] (NumPy or torch) -> float32 [B, 3, H, W] in [0, 1]."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise SunEdgeError(f"expected uint8 images [B, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div(255.0).contiguous()  # [B,3,H,W]


class AttributeClassifier(nn.Module):
    """Conv stages -> global mean+max pool -> ``features`` -> one linear head per attribute."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(config.widths):
            layers += [nn.Conv2d(c_in, c, 3, stride=2 if i == 0 else 1, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True)]
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.body = nn.Sequential(*layers)
        self.neck = nn.Sequential(nn.Linear(2 * c_in, config.features), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({a: nn.Linear(config.features, len(VALUES[a])) for a in ATTRIBUTES})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [0, 1] -> penultimate features [B, F]."""
        h = self.body(x)  # [B,C,H/16,W/16]
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # [B,2C]
        return self.neck(pooled)  # [B,F]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """float [B, 3, H, W] in [0, 1] -> {attribute: logits [B, classes]}."""
        f = self.features(x)  # [B,F]
        return {a: head(f) for a, head in self.heads.items()}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flips and a quarter turn (whole batch), then per-image brightness, blur and noise; [B,3,H,W]."""
    b = x.shape[0]
    k = int(torch.randint(4, (1,), generator=gen))
    x = torch.rot90(x, k, dims=(2, 3))
    if bool(torch.rand(1, generator=gen) < 0.5):
        x = x.flip(3)
    x = x * (1.0 + 0.08 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5))
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4.0
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)  # [3,1,3,3]
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)  # [B,3,H,W]
    amount = (torch.rand(b, 1, 1, 1, generator=gen) < 0.3) * torch.rand(b, 1, 1, 1, generator=gen)
    x = x + amount * (blurred - x)
    x = x + 0.05 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(0.0, 1.0)


def labels_of(scenes: list) -> dict[str, torch.Tensor]:
    """{attribute: class indices [B]} for a list of scenes (count 1..3 -> 0..2)."""
    return {a: torch.tensor([VALUES[a].index(getattr(s, a)) for s in scenes]) for a in ATTRIBUTES}


def render_pool(n: int, seed: int, styles: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` images split evenly over ``styles`` (uint8 [n,H,W,3], world ``seed``) and their labels."""
    images, scenes = [], []
    for j, style in enumerate(styles):
        if style not in STYLES:
            raise SunEdgeError(f"unknown style {style!r}: choose from {', '.join(STYLES)}")
        part, part_scenes = scene_batch(n // len(styles), seed + j, style)
        images.append(part)
        scenes += part_scenes
    return torch.from_numpy(np.concatenate(images)), labels_of(scenes)


def train_classifier(*, steps: int, batch_size: int, seed: int, styles: tuple[str, ...] = ("plain", "toon"),
                     device: str = "cpu", progress: bool = True, pool: int = 8192, lr: float = 3e-3,
                     config: ClassifierConfig = ClassifierConfig()) -> AttributeClassifier:
    """Train on a pool of ``pool`` images rendered from world ``seed`` (split over ``styles``), augmented.

    AdamW with a one-cycle schedule; the loss is the sum of the heads' cross-entropies.
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = AttributeClassifier(config).to(device)
    images, labels = render_pool(pool, seed, styles)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    bar = tqdm(range(steps), desc="classifier", unit="step", disable=not progress, file=sys.stderr)
    for _ in bar:
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = augment(to_input(images[idx]), gen).to(device)  # [B,3,H,W]
        logits = model(x)
        loss = sum(F.cross_entropy(logits[a], labels[a][idx].to(device)) for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


@torch.no_grad()
def predict(model: AttributeClassifier, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """uint8 [B, H, W, 3] -> {attribute: int64 [B]}: indices into the attribute tuples, count as its value."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[np.ndarray]] = {a: [] for a in ATTRIBUTES}
    for i in range(0, len(images), batch_size):
        logits = model(to_input(images[i:i + batch_size]).to(device))
        for a in ATTRIBUTES:
            out[a].append(logits[a].argmax(1).cpu().numpy())
    result = {a: np.concatenate(v).astype(np.int64) for a, v in out.items()}
    result["count"] = np.asarray(COUNTS, np.int64)[result["count"]]
    return result


@torch.no_grad()
def extract_features(model: AttributeClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float64 [B, F] penultimate features, for ``frechet_distance``."""
    model.eval()
    device = next(model.parameters()).device
    parts = [model.features(to_input(images[i:i + batch_size]).to(device)).double().cpu().numpy()
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts)


def truth(scenes: list) -> dict[str, np.ndarray]:
    """The scenes' attributes in ``predict``'s form: {attribute: int64 [B]}, indices into the tuples, count as its value."""
    out = {a: np.array([VALUES[a].index(getattr(s, a)) for s in scenes], np.int64) for a in ATTRIBUTES}
    out["count"] = np.array([s.count for s in scenes], np.int64)
    return out


def accuracy(model: AttributeClassifier, images: np.ndarray, scenes: list) -> dict[str, float]:
    """Per-attribute accuracy of ``predict`` against the true scenes."""
    pred, want = predict(model, images), truth(scenes)
    return {a: float((pred[a] == want[a]).mean()) for a in ATTRIBUTES}


def evaluate(model: AttributeClassifier, *, n: int = 1000, seed: int = HELD_OUT,
             styles: tuple[str, ...] = ("plain", "toon")) -> dict[str, dict[str, float]]:
    """{style: {attribute: accuracy}} on ``n`` images per style of world ``seed`` (held out by default)."""
    return {style: accuracy(model, *scene_batch(n, seed, style)) for style in styles}


def save_classifier(model: AttributeClassifier, path: Path | str) -> Path:
    """Write the weights as safetensors (atomically), the config and format in the metadata."""
    from sun_edge.weights import write_safetensors_atomic

    path = Path(path).expanduser()
    cfg = asdict(model.config)
    write_safetensors_atomic(model.state_dict(), path, {"format": FORMAT, "config": json.dumps(cfg)})
    return path


def load_classifier(path: Path | str = DEFAULT_WEIGHTS, device: str = "cpu") -> AttributeClassifier:
    """Read ``save_classifier``'s file into an eval-mode model; one error line if missing or bad."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise SunEdgeError(f"pocket classifier weights {path} not found: train them with "
                           "sun_edge.pocket.classifier.train_classifier and save_classifier")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as e:  # safetensors raises SafetensorError, OSError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SunEdgeError(f"cannot read pocket classifier {path}: {reason}") from e
    if meta.get("format") != FORMAT:
        raise SunEdgeError(f"{path} is not a pocket classifier (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        raw = json.loads(meta["config"])
        config = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except (KeyError, TypeError, ValueError) as e:
        raise SunEdgeError(f"{path}: bad classifier config in metadata ({e})") from e
    model = AttributeClassifier(config)
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or extra or wrong:
        raise SunEdgeError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {extra[:3]}, "
                           f"wrong shape {wrong[:3]})")
    model.load_state_dict(tensors)
    return model.to(device).eval()


def frechet_from_moments(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), the trace root via sqrt(C1) C2 sqrt(C1) (eigh, float64)."""
    mu1, mu2, cov1, cov2 = (np.asarray(a, np.float64) for a in (mu1, mu2, cov1, cov2))

    def sqrt_psd(c: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((c + c.T) / 2)
        return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T

    root1 = sqrt_psd(cov1)
    middle = root1 @ cov2 @ root1  # symmetric PSD, same eigenvalues as C1 C2
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_root)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, F] and [M, F] (N, M >= 2)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise SunEdgeError(f"frechet_distance needs two [N, F] feature sets with N >= 2, got {a.shape} and {b.shape}")
    return frechet_from_moments(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def main() -> None:  # python -m sun_edge.pocket.classifier [STEPS]: train, report, save to DEFAULT_WEIGHTS
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else RECOMMENDED_STEPS
    start, cpu = time.perf_counter(), time.process_time()
    model = train_classifier(steps=steps, batch_size=64, seed=0)
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"trained {steps} steps in {took:.1f}s wall, {cpu:.1f}s CPU, {torch.get_num_threads()} threads "
          f"({sum(p.numel() for p in model.parameters())} parameters)")
    print(json.dumps(evaluate(model), indent=1))
    print(f"saved {save_classifier(model, DEFAULT_WEIGHTS)}")


if __name__ == "__main__":
    main()
