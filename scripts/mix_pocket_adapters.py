"""Average SUN adapters fine-tuned from one start (a weight "soup"), to try between their trade-offs.

    python scripts/mix_pocket_adapters.py OUT.safetensors A.safetensors:0.5 B.safetensors:0.5

Each input is PATH:WEIGHT; the weights must sum to 1. Every input must hold the same tensors with the same
shapes (adapters of one layout for one UNet); the mean is taken in float32 and written in fp16 with the
inputs' format metadata and a ``mixed_from`` record of the inputs and their SHA-256. docs/pocket.md records why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from sun_edge.errors import SunEdgeError
from sun_edge.weights import read_metadata, read_state_dict, write_safetensors_atomic


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_input(text: str) -> tuple[Path, float]:
    path, sep, weight = text.rpartition(":")
    if not sep:
        raise SunEdgeError(f"{text!r}: write each input as PATH:WEIGHT, for example a.safetensors:0.5")
    try:
        return Path(path), float(weight)
    except ValueError:
        raise SunEdgeError(f"{text!r}: the weight after ':' must be a number") from None


def mix(inputs: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    if abs(sum(w for _, w in inputs) - 1.0) > 1e-6:
        raise SunEdgeError(f"the weights sum to {sum(w for _, w in inputs):g}; they must sum to 1")
    states = [read_state_dict(path) for path, _ in inputs]
    first = states[0]
    for (path, _), state in zip(inputs[1:], states[1:]):
        if state.keys() != first.keys():
            raise SunEdgeError(f"{path.name} holds other tensors than {inputs[0][0].name}: only adapters of one "
                               f"layout for one UNet can be mixed")
        if bad := [k for k in first if state[k].shape != first[k].shape]:
            raise SunEdgeError(f"{path.name}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, "
                               f"{inputs[0][0].name} has {tuple(first[bad[0]].shape)}")
    return {k: sum(w * s[k].float() for (_, w), s in zip(inputs, states)) for k in first}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("inputs", nargs="+", metavar="PATH:WEIGHT")
    args = parser.parse_args(argv)
    try:
        inputs = [parse_input(text) for text in args.inputs]
        if args.out.exists():
            raise SunEdgeError(f"{args.out} exists; choose a new file name")
        tensors = mix(inputs)
    except SunEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metadata: dict[str, str] = {}
    for path, _ in reversed(inputs):  # an earlier file's format keys win; a file may have none (the released layout)
        metadata.update(read_metadata(path))
    metadata["mixed_from"] = json.dumps([{"file": p.name, "sha256": _sha256(p), "weight": w} for p, w in inputs])
    write_safetensors_atomic({k: v.half().contiguous() for k, v in tensors.items()}, args.out, metadata=metadata)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
