"""Generate ``sun_edge/data/vocab.json`` and ``sun_edge/data/merges.txt`` offline.

The two files are the Hugging Face ``CLIPTokenizer`` files as ``openai/clip-vit-large-patch14``
(the SD1.5 text encoder) ships them. They are derived from the CLIP BPE vocabulary
``bpe_simple_vocab_16e6.txt.gz`` that open-clip-torch bundles, the same way OpenAI CLIP's
``simple_tokenizer.py`` builds its vocabulary:

- merges: lines ``[1 : 49152 - 256 - 2 + 1]`` of the gzip file (48894 merges; line 0 is a header);
- vocab: the 256 byte characters of ``bytes_to_unicode()``, the same 256 with ``</w>``, one entry
  per merge (the two halves joined), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Output format (matching the Hugging Face files byte for byte):

- ``merges.txt``: ``#version: 0.2`` then one merge per line, ``\\n`` separated, no final newline;
- ``vocab.json``: one line, ``json.dumps(vocab, ensure_ascii=False, sort_keys=True)``, no final
  newline (UTF-8, 961143 bytes).

open_clip is located with ``importlib.util.find_spec`` and never imported (its ``__init__``
imports torchvision). Usage::

    python scripts/make_vocab.py                 # writes sun_edge/data/
    python scripts/make_vocab.py --out /tmp/tok  # writes elsewhere
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
from pathlib import Path

from sun_edge.tokenizer import bytes_to_unicode  # the byte map the tokenizer decodes with

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # 48894: CLIP's vocab of 49408 = 512 byte tokens + merges + 2 specials
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MERGES_HEADER = "#version: 0.2"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "sun_edge" / "data"


def find_open_clip_bpe() -> Path:
    """Path of open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz``, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: open_clip is not installed; pip install --no-deps open-clip-torch, or pass --bpe")
    for location in spec.submodule_search_locations:
        path = Path(location) / BPE_FILENAME
        if path.is_file():
            return path
    raise SystemExit(f"error: {BPE_FILENAME} not found in the open_clip package; pass --bpe")


def read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """The 48894 merges CLIP uses, as (left, right) pairs in rank order."""
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    bad = [m for m in merges if len(m) != 2]
    if len(merges) != NUM_MERGES or bad:
        raise SystemExit(f"error: {bpe_path} is not the CLIP BPE file ({len(merges)} merges, {len(bad)} malformed)")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token string -> id, in CLIP's order (byte chars, byte chars + ``</w>``, merges, specials)."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise SystemExit("error: duplicate tokens in the CLIP vocabulary")
    return vocab


def render_vocab_json(vocab: dict[str, int]) -> str:
    """``vocab.json`` text exactly as the Hugging Face CLIP repositories store it."""
    return json.dumps(vocab, ensure_ascii=False, sort_keys=True)


def render_merges_txt(merges: list[tuple[str, str]]) -> str:
    """``merges.txt`` text exactly as the Hugging Face CLIP repositories store it."""
    return "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)])


def write_files(out_dir: Path, bpe_path: Path) -> list[Path]:
    """Write ``vocab.json`` and ``merges.txt`` into ``out_dir``; return their paths."""
    merges = read_merges(bpe_path)
    vocab = build_vocab(merges)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_bytes(render_vocab_json(vocab).encode("utf-8"))
    merges_path.write_bytes(render_merges_txt(merges).encode("utf-8"))
    return [vocab_path, merges_path]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: sun_edge/data)")
    parser.add_argument("--bpe", type=Path, default=None, help="CLIP BPE .txt.gz (default: open_clip's copy)")
    args = parser.parse_args(argv)
    bpe_path = args.bpe if args.bpe is not None else find_open_clip_bpe()
    for path in write_files(args.out, bpe_path):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
