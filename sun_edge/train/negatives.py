"""Negative prompts for training: a pool of distinct phrases, sampled and joined per example.

The paper (section 4.1) split negative prompts people use at comma boundaries into 832
distinct phrases and, per training example, joined 0 to 100 of them uniformly sampled.
sun-edge ships its own curated pool (``negative_phrases.txt``, one lower-case phrase a
line: image quality, anatomy, artefacts, styles, colours, lighting, composition, objects,
text and watermarks). A pool file of one's own (``--negative-pool``) has the same format;
blank lines and lines starting with ``#`` are ignored.

The CLIP text encoder reads 77 tokens, so a long negative prompt is cut there when it is
tokenized: since phrases come in random order, what remains is a random subset.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from sun_edge.errors import SunEdgeError

POOL_FILE = "negative_phrases.txt"


def parse_pool(text: str, source: str) -> tuple[str, ...]:
    """Phrases of a pool file; raise one line for commas, duplicates or an empty pool."""
    phrases = [line.strip() for line in text.splitlines()]
    phrases = [p for p in phrases if p and not p.startswith("#")]
    if not phrases:
        raise SunEdgeError(f"negative phrase pool {source} holds no phrases")
    with_comma = [p for p in phrases if "," in p]
    if with_comma:
        raise SunEdgeError(f"negative phrase pool {source}: phrases are joined with commas, so none may hold one "
                           f"(first: {with_comma[0]!r})")
    seen: set[str] = set()
    duplicates = [p for p in phrases if p in seen or seen.add(p)]  # type: ignore[func-returns-value]
    if duplicates:
        raise SunEdgeError(f"negative phrase pool {source} repeats {len(duplicates)} phrase(s) "
                           f"(first: {duplicates[0]!r}); keep each once")
    return tuple(phrases)


def load_pool(path: Path | str | None = None) -> tuple[str, ...]:
    """The bundled pool, or the phrases of ``path``."""
    if path is None:
        return parse_pool(resources.files("sun_edge.train").joinpath(POOL_FILE).read_text("utf-8"), POOL_FILE)
    path = Path(path)
    if not path.is_file():
        raise SunEdgeError(f"negative phrase pool {path} does not exist")
    return parse_pool(path.read_text("utf-8"), str(path))


def sample_negative(pool: tuple[str, ...], rng: np.random.Generator, max_phrases: int = 100) -> str:
    """Algorithm 1's ``p_n ~ p(Y)``: a count uniform in [0, max_phrases], then that many distinct phrases.

    The count is capped by the pool's size. Joined with ``", "``; a count of 0 gives ``""``.
    """
    count = min(int(rng.integers(0, max_phrases + 1)), len(pool))
    picks = rng.choice(len(pool), size=count, replace=False)
    return ", ".join(pool[int(i)] for i in picks)
