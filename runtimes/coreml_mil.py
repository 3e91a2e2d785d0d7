"""A NumPy evaluator for Core ML ML Programs: parity checks of ``.mlpackage`` files off macOS.

Core ML predicts only on Apple platforms; coremltools reads and writes models everywhere. This
module reads a saved ``.mlpackage`` back into coremltools' MIL program (``load_program``: the
spec through ``coremltools.converters.mil.frontend.milproto.load``, weights from the package's
blob file), and ``MILEvaluator`` runs its ``main`` function operation by operation with the
NumPy kernels of ``coreml_mil_ops``:

- ``const`` values are taken as stored; ``constexpr_*`` ops (palettized, quantized or sparse
  weights) are decompressed once, at load, by each op's own ``materialized_val_inference``;
- every other op is computed in float32 from its inputs (float16 inputs widened exactly), then
  rounded to the dtype the program declares for its output: an FP16 program is evaluated with
  float16 values between ops and float32 accumulation inside them. That is a model of Core ML's
  float16 execution, not a bit-exact copy: devices may accumulate differently (the Neural Engine
  in float16), so the evaluator proves the graph and its float16 storage right, and a Mac measures
  the rest (tests marked for macOS);
- every output is checked against the shape the program declares for it, so a kernel that
  misreads an op's semantics fails loudly at that op rather than drifting the result.

An op type without a kernel is reported when the program is loaded, all of them in one line.
Values are freed after their last use, so memory stays near that of the largest layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sun_edge.bundle import TensorSpec
from sun_edge.errors import SunEdgeError
from sun_edge.runtimes.coreml_mil_ops import KERNELS, Args


@dataclass(frozen=True)
class Step:
    """One operation of the program, resolved: constants inline, runtime values by name."""

    op_type: str
    name: str
    args: dict[str, Any]  # input name -> ("var", name) | ("const", value) | ("tuple", (arg, ...))
    outputs: tuple[tuple[str, np.dtype, tuple[int, ...]], ...]  # (name, dtype, declared shape)


def load_program(path: Path | str) -> Any:
    """The MIL program of a saved ``.mlpackage`` (coremltools' PyMIL ``Program``), weights included."""
    from sun_edge.runtimes.coreml import import_coremltools

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise SunEdgeError(f"{path} is not an .mlpackage (it has no Manifest.json)")
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load

    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
    except Exception as e:  # coremltools raises plain Exceptions for unreadable packages
        raise SunEdgeError(f"cannot read {path.name} with coremltools {ct.__version__}: {e}") from e
    if spec.WhichOneof("Type") != "mlProgram":
        raise SunEdgeError(f"{path.name} is a {spec.WhichOneof('Type')} model; the evaluator runs ML Programs only")
    return load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)


def _dtype(var: Any) -> np.dtype:
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(var.dtype))


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(int(d) if isinstance(d, (int, np.integer)) else -1 for d in var.shape)


def _constant(var: Any) -> Any | None:
    """The value of a var produced by ``const`` or ``constexpr_*`` (decompressed), else None."""
    op = var.op
    if op is None or op.op_type == "const":
        return var.val
    if op.op_type.startswith("constexpr_"):
        values = op.materialized_val_inference()
        values = values if isinstance(values, tuple) else (values,)
        return np.asarray(values[list(op.outputs).index(var)])
    return None


def _arg(var: Any) -> tuple[str, Any]:
    if isinstance(var, (tuple, list)):
        return ("tuple", tuple(_arg(v) for v in var))
    value = _constant(var)
    return ("var", var.name) if value is None else ("const", value)


class MILEvaluator:
    """Runs one function of a MIL program with NumPy: ``evaluator({"sample": x, ...}) -> {"noise_pred": y}``."""

    def __init__(self, program: Any, *, function: str = "main", what: str = "program") -> None:
        if function not in program.functions:
            raise SunEdgeError(f"{what} has no function {function!r}; it has {', '.join(program.functions)}")
        func = program.functions[function]
        self.what = what
        ops = [op for op in func.operations if op.op_type != "const" and not op.op_type.startswith("constexpr_")]
        missing = sorted({op.op_type for op in ops} - set(KERNELS))
        nested = sorted({op.op_type for op in ops if op.blocks})
        if missing or nested:
            raise SunEdgeError(f"{what}: the NumPy MIL evaluator has no kernel for op type(s) "
                               f"{', '.join(missing + nested)}; covered: see sun_edge.runtimes.coreml_mil_ops.KERNELS")
        self.inputs = tuple(TensorSpec(name, _dtype(v).name, _shape(v)) for name, v in func.inputs.items())
        self.outputs = tuple(TensorSpec(v.name, _dtype(v).name, _shape(v)) for v in func.outputs)
        self.steps = tuple(Step(op.op_type, op.name, {k: _arg(v) for k, v in op.inputs.items() if v is not None},
                                tuple((o.name, _dtype(o), _shape(o)) for o in op.outputs)) for op in ops)
        self.constants = {v.name: _constant(v) for v in func.outputs if _constant(v) is not None}
        self._last_use = self._last_uses()

    @classmethod
    def load(cls, path: Path | str) -> MILEvaluator:
        """An evaluator for the ``main`` function of a saved ``.mlpackage``."""
        return cls(load_program(path), what=Path(path).name)

    def op_types(self) -> dict[str, int]:
        """How many operations of each type the function runs (constants excluded)."""
        counts: dict[str, int] = {}
        for step in self.steps:
            counts[step.op_type] = counts.get(step.op_type, 0) + 1
        return dict(sorted(counts.items()))

    def _last_uses(self) -> dict[str, int]:
        last: dict[str, int] = {}

        def visit(arg: tuple[str, Any], i: int) -> None:
            if arg[0] == "var":
                last[arg[1]] = i
            elif arg[0] == "tuple":
                for a in arg[1]:
                    visit(a, i)
        for i, step in enumerate(self.steps):
            for arg in step.args.values():
                visit(arg, i)
        for spec in self.outputs:
            last[spec.name] = len(self.steps)
        return last

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Every input present with the program's dtype and shape; one line naming the first that is not."""
        for spec in self.inputs:
            if spec.name not in feeds:
                raise SunEdgeError(f"{self.what}: input {spec.name!r} missing; it takes {', '.join(s.name for s in self.inputs)}")
            x = feeds[spec.name]
            if not isinstance(x, np.ndarray) or x.dtype != np.dtype(spec.dtype) or x.shape != spec.shape:
                got = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
                raise SunEdgeError(f"{self.what}: input {spec.name} must be {spec.dtype} {list(spec.shape)}, got {got}")

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Evaluate the function on ``feeds`` (input name -> array); returns its outputs by name."""
        self.check_feeds(feeds)
        env: dict[str, Any] = {s.name: np.asarray(feeds[s.name]) for s in self.inputs}
        env.update(self.constants)

        def value(arg: tuple[str, Any]) -> Any:
            kind, x = arg
            if kind == "tuple":
                return tuple(value(a) for a in x)
            v = env[x] if kind == "var" else x
            if isinstance(v, (np.ndarray, np.generic)) and v.dtype == np.float16:
                return v.astype(np.float32)
            return v

        for i, step in enumerate(self.steps):
            try:
                result = KERNELS[step.op_type](Args(step.op_type, {k: value(a) for k, a in step.args.items()}))
            except SunEdgeError as e:
                raise SunEdgeError(f"{self.what}: op {step.name} ({step.op_type}): {e}") from e
            except (ValueError, TypeError, IndexError) as e:
                raise SunEdgeError(f"{self.what}: the NumPy evaluator failed at op {step.name} ({step.op_type}): {e}") from e
            results = result if isinstance(result, tuple) else (result,)
            for (name, dtype, shape), out in zip(step.outputs, results, strict=True):
                out = np.asarray(out).astype(dtype, copy=False)
                if len(shape) != out.ndim or any(d >= 0 and d != s for d, s in zip(shape, out.shape)):
                    raise SunEdgeError(f"{self.what}: op {step.name} ({step.op_type}) gave shape {list(out.shape)}, "
                                       f"the program declares {list(shape)}: an evaluator kernel is wrong")
                env[name] = out
            for arg in step.args.values():
                for name in _names(arg):
                    if self._last_use.get(name) == i and name in env:
                        del env[name]
        return {spec.name: np.asarray(env[spec.name]) for spec in self.outputs}


def _names(arg: tuple[str, Any]) -> list[str]:
    if arg[0] == "var":
        return [arg[1]]
    if arg[0] == "tuple":
        return [n for a in arg[1] for n in _names(a)]
    return []
