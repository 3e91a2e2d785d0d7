"""sun-edge: SpeedUpNet (SUN) Stable Diffusion 1.5 in 4 single-forward steps, on edge runtimes.

``import sun_edge`` is light: ``Pipeline`` and ``Settings`` load on first use, and nothing
here imports PyTorch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "Settings", "SunEdgeError", "__version__"]

from sun_edge.errors import SunEdgeError


def __getattr__(name: str) -> Any:
    if name in ("Pipeline", "Settings"):
        from sun_edge import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sun_edge' has no attribute {name!r}")
