"""An OpenVINO compiled model behind the part of ONNX Runtime's InferenceSession the measurement harness uses
(get_inputs, get_outputs, get_providers, run), so the same interleaved harness times both runtimes.

Where the model has dynamic dims, each input-shape signature gets its own statically reshaped compilation on its
first call (what a deployment that knows its shapes does, and what lets the CPU plugin pick its fastest kernels);
the first call at a shape is an untimed check run in the harness, so compilation lands in the cold start, not in
the timed calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import MeasurementFailed

# OpenVINO element types -> ONNX Runtime's type strings (what workers.onnx_tools.inputs and fidelity read).
ONNX_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "bf16": "tensor(bfloat16)", "f64": "tensor(double)",
              "i64": "tensor(int64)", "i32": "tensor(int32)", "i16": "tensor(int16)", "i8": "tensor(int8)",
              "u8": "tensor(uint8)", "u16": "tensor(uint16)", "u32": "tensor(uint32)", "u64": "tensor(uint64)",
              "boolean": "tensor(bool)", "string": "tensor(string)"}
# The inference precision hint each target precision compiles with: int8 keeps the float remainder of the
# graph (what NNCF left unquantized) in f32.
PRECISION_HINTS = {"f32": "f32", "bf16": "bf16", "int8": "f32", "int8_bf16": "bf16"}


@dataclass(frozen=True)
class Port:
    """What InferenceSession.get_inputs()/get_outputs() items offer: name, shape (None for a dynamic dim), type."""

    name: str
    shape: list[int | None]
    type: str


def core():
    import openvino as ov

    return ov.Core()


def compile_config(precision: str, threads: int) -> dict[str, Any]:
    """One stream, latency hint, `threads` inference threads: the settings every OpenVINO model measured here gets."""
    if precision not in PRECISION_HINTS:
        raise ValueError(f"unknown OpenVINO precision {precision!r}; known: {', '.join(PRECISION_HINTS)}")
    # Pinning off: two OpenVINO models taking turns in one process measured 10-40% apart with OpenVINO's own
    # thread pinning on a loaded machine, within 3% without it (bench/runtimes.py); the measuring process is
    # pinned to its cores already (workers.measure.isolated).
    return {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "INFERENCE_NUM_THREADS": int(threads),
            "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}


def _port_name(port, hint: list[str]) -> str:
    names = port.get_names()
    return next((n for n in hint if n in names), None) or (sorted(names)[0] if names else port.get_any_name())


def _port(port, hint: list[str]) -> Port:
    shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    kind = port.get_element_type().get_type_name()
    return Port(_port_name(port, hint), shape, ONNX_TYPES.get(kind, f"tensor({kind})"))


class OpenVINOSession:
    """A model (an .onnx file or an IR .xml) compiled for the CPU at `precision`.

    output_names: the original ONNX model's output names, so outputs pair by name with ONNX Runtime's even where
    OpenVINO keeps several names per tensor.
    """

    def __init__(self, path: Path, *, precision: str, threads: int, device: str = "CPU",
                 output_names: list[str] | None = None) -> None:
        self.path, self.precision, self.device = Path(path), precision, device
        self.config = compile_config(precision, threads)
        self._core = core()
        try:
            self.model = self._core.read_model(str(self.path))
        except Exception as exc:
            raise MeasurementFailed(f"OpenVINO could not read {self.path.name}: {_short(exc)}") from exc
        self._inputs = [_port(p, []) for p in self.model.inputs]
        self._outputs = [_port(p, output_names or []) for p in self.model.outputs]
        self.dynamic = any(p.get_partial_shape().is_dynamic for p in self.model.inputs)
        self._compiled: dict[tuple, Any] = {}
        if not self.dynamic:  # compiled now: a static model's load time is its compilation
            self._request(())

    def get_inputs(self) -> list[Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[Port]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [f"OpenVINO {self.device} ({self.precision})"]

    def _request(self, signature: tuple):
        request = self._compiled.get(signature)
        if request is not None:
            return request
        model = self.model
        if signature:
            model = self.model.clone()
            model.reshape({port.get_any_name(): list(shape) for port, shape in zip(model.inputs, signature)})
        try:
            compiled = self._core.compile_model(model, self.device, self.config)
        except Exception as exc:
            raise MeasurementFailed(f"OpenVINO could not compile {self.path.name} for {self.device} at "
                                    f"{self.precision}: {_short(exc)}") from exc
        request = self._compiled[signature] = compiled.create_infer_request()
        return request

    def run(self, output_names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [feed[port.name] for port in self._inputs]
        signature = tuple(tuple(a.shape) for a in arrays) if self.dynamic else ()
        request = self._request(signature)
        results = request.infer(arrays, share_inputs=True, share_outputs=False)
        return [np.asarray(results[port]) for port in request.model_outputs]


def _short(exc: Exception, limit: int = 1500) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
