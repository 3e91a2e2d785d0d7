"""Run Python code in a subprocess where importing torch, diffusers or transformers fails.

The contract that bundles run without PyTorch (DESIGN.md) is tested this way: the code under
test must not even try to import them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_HEAVY = """
import importlib.abc, sys

class BlockHeavy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, BlockHeavy())
"""


def run_without_torch(code: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) after installing the import blocker; raises if it fails."""
    return subprocess.run([sys.executable, "-c", BLOCK_HEAVY + textwrap.dedent(code)], check=True, **kwargs)
