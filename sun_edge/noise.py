"""Initial latent noise from a seed, in NumPy: portable, or the same numbers as PyTorch.

``kind="numpy"`` is NumPy's PCG64 generator with ziggurat normals: the same on every
platform, and this function's default. ``kind="torch"`` (what ``Settings`` and the CLI use by
default, so a seed gives a diffusers pipeline's image) reproduces
``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` on the CPU without
importing torch, so a seed gives the same image in a bundle as in a diffusers script.

How PyTorch's CPU generator makes float32 normals (checked against torch 2.13):

- the engine is mt19937 seeded with ``seed mod 2**32`` (Matsumoto-Nishimura init_genrand);
- numel >= 16 ("normal_fill"): numel uniforms ``(u32 & (2**24 - 1)) * 2**-24``, then
  Box-Muller on each block of 16 (for j < 8: u1 = 1 - u[j], u2 = u[j + 8],
  r = sqrt(-2 log u1), theta = 2 pi u2, out[j] = r cos theta, out[j + 8] = r sin theta);
  when numel % 16 != 0, 16 fresh uniforms replace the last 16 values and are transformed;
- numel < 16 (scalar path): per pair of outputs, two float64 uniforms
  ``((hi << 32 | lo) & (2**53 - 1)) * 2**-53`` from two draws each, u1 then u2,
  r = sqrt(-2 log(1 - u2)), theta = 2 pi u1, out = r cos theta, r sin theta (in float64).

x86 builds of PyTorch (AVX2, AVX512) run the block transform with SLEEF float32 math
and theta = float32(2 pi) * u2; this module does the same operations with correctly
rounded float32 results, so values agree to a few float32 ulps (about 5e-7 absolute on
x86, 2e-6 against the scalar fallback build), not bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from sun_edge.errors import SunEdgeError

NoiseKind = Literal["numpy", "torch"]
NOISE_KINDS: tuple[NoiseKind, ...] = ("numpy", "torch")

_MT_STATE_LEN = 624
_TWO_PI_F32 = np.float32(2.0 * math.pi)


def initial_noise(seed: int, shape: Sequence[int], *, kind: NoiseKind = "numpy") -> np.ndarray:
    """Unit-variance Gaussian noise of ``shape`` from ``seed`` (0 <= seed < 2**64), float32.

    ``numpy``: ``np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)``.
    ``torch``: PyTorch's CPU ``torch.randn`` (mt19937 + Box-Muller), computed in NumPy.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise SunEdgeError(f"seed must be an int between 0 and 2**64 - 1, got {seed!r}")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise SunEdgeError(f"noise shape must not have negative sizes, got {dims}")
    if kind == "numpy":
        return np.random.default_rng(int(seed)).standard_normal(dims, dtype=np.float32)
    if kind == "torch":
        return torch_randn(int(seed), dims)
    raise SunEdgeError(f"unknown noise kind {kind!r}; choose one of: {', '.join(NOISE_KINDS)}")


def mt19937(seed: int) -> np.random.MT19937:
    """An MT19937 bit generator seeded as ``torch.Generator().manual_seed(seed)`` (init_genrand).

    Only the low 32 bits of the seed count, as in PyTorch's CPU generator.
    """
    key = np.empty(_MT_STATE_LEN, dtype=np.uint32)
    s = seed & 0xFFFFFFFF
    for i in range(_MT_STATE_LEN):
        key[i] = s
        s = (1812433253 * (s ^ (s >> 30)) + i + 1) & 0xFFFFFFFF
    bit_generator = np.random.MT19937()
    bit_generator.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": _MT_STATE_LEN}}
    return bit_generator


def _uniform24(bit_generator: np.random.MT19937, n: int) -> np.ndarray:
    """n float32 uniforms in [0, 1) from the low 24 bits of n 32-bit draws (uniform_real_distribution<float>)."""
    raw = bit_generator.random_raw(n) & 0xFFFFFF  # [n] uint64
    return raw.astype(np.float32) * np.float32(2.0**-24)


def _uniform53(bit_generator: np.random.MT19937, n: int) -> np.ndarray:
    """n float64 uniforms in [0, 1) from the low 53 bits of (first << 32 | second) draws."""
    raw = bit_generator.random_raw(2 * n).reshape(n, 2)  # [n, 2] uint64 holding 32-bit draws
    bits = ((raw[:, 0] << np.uint64(32)) | raw[:, 1]) & np.uint64(2**53 - 1)
    return bits.astype(np.float64) * 2.0**-53


def _box_muller_16(u: np.ndarray) -> np.ndarray:
    """Box-Muller on blocks of 16 float32 uniforms [k, 16] -> normals [k, 16] (ATen normal_fill_16)."""
    u1 = np.float32(1.0) - u[:, :8]  # (0, 1]
    u2 = u[:, 8:]
    log_u1 = np.log(u1.astype(np.float64)).astype(np.float32)
    radius = np.sqrt(np.float32(-2.0) * log_u1).astype(np.float32)  # [k, 8]
    theta = (_TWO_PI_F32 * u2).astype(np.float64)  # float32 product, as on x86 builds
    cos = np.cos(theta).astype(np.float32)
    sin = np.sin(theta).astype(np.float32)
    return np.concatenate([radius * cos, radius * sin], axis=1)  # [k, 16] float32


def torch_randn(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` on CPU, in NumPy.

    mt19937 uniforms and Box-Muller, following ATen's normal_fill (numel >= 16) or its
    scalar float64 path (numel < 16); see the module docstring.
    """
    n = math.prod(shape)
    bit_generator = mt19937(seed)
    if n < 16:
        pairs = (n + 1) // 2
        u = _uniform53(bit_generator, 2 * pairs).reshape(pairs, 2)  # [pairs, (u1, u2)]
        radius = np.sqrt(-2.0 * np.log1p(-u[:, 1]))
        theta = 2.0 * math.pi * u[:, 0]
        out = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1).reshape(-1)[:n]
        return out.astype(np.float32).reshape(shape)
    blocks = n // 16
    out = np.empty(n, dtype=np.float32)
    uniforms = _uniform24(bit_generator, n)
    out[: blocks * 16] = _box_muller_16(uniforms[: blocks * 16].reshape(blocks, 16)).reshape(-1)
    if n % 16:
        out[-16:] = _box_muller_16(_uniform24(bit_generator, 16).reshape(1, 16)).reshape(-1)
    return out.reshape(shape)
