"""A .tflite model on LiteRT's CPU interpreter (ai-edge-litert) behind the part of ONNX Runtime's InferenceSession
the measurement harness uses (get_inputs, get_outputs, get_providers, run), so the same interleaved harness times
LiteRT beside ONNX Runtime.

The model is called through its signature (serving_default), whose input names are the ONNX model's (onnx2tf keeps
them) and whose outputs are output_0, output_1, ... in the ONNX model's output order (TensorFlow's converter names
them so): the session offers them under the ONNX names, so outputs pair by name with ONNX Runtime's. The signature
runner resizes the interpreter's tensors when a call's shapes change (a dynamic batch axis), which the harness's
untimed check call per batch size pays for.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import MeasurementFailed

SIGNATURE = "serving_default"


@dataclass(frozen=True)
class Port:
    """What InferenceSession.get_inputs()/get_outputs() items offer: name, shape (None for a dynamic dim), type."""

    name: str
    shape: list[int | None]
    type: str


def onnx_type(dtype: Any) -> str:
    """numpy dtype -> ONNX Runtime's type string (what workers.onnx_tools.inputs and fidelity read)."""
    from workers.onnx_tools.inputs import ORT_DTYPES

    wanted = np.dtype(dtype)
    return next((name for name, kind in ORT_DTYPES.items() if np.dtype(kind) == wanted), f"tensor({wanted.name})")


def _sanitized(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def signature_names(signature: list[str], onnx_names: list[str], *, outputs: bool) -> dict[str, str]:
    """ONNX name -> signature key. Inputs by name (as onnx2tf may have sanitized it, or the one input); outputs by
    name where onnx2tf kept them, else output_<position>. Raises MeasurementFailed where a name has no key."""
    keys = set(signature)
    mapping: dict[str, str] = {}
    for position, name in enumerate(onnx_names):
        for key in (name, _sanitized(name), f"output_{position}" if outputs else None):
            if key in keys:
                mapping[name] = key
                break
        else:
            if not outputs and len(onnx_names) == 1 and len(signature) == 1:
                mapping[name] = signature[0]
            else:
                kind = "output" if outputs else "input"
                raise MeasurementFailed(f"the .tflite model's signature has no {kind} for the ONNX {kind} {name!r} "
                                        f"(it has {', '.join(sorted(keys)) or 'none'})")
    return mapping


class LiteRTSession:
    """A .tflite file on LiteRT's CPU interpreter with `threads` threads (XNNPACK, LiteRT's default CPU delegate).

    input_names / output_names: the ONNX model's, in its order.
    """

    def __init__(self, path: Path, *, threads: int, input_names: list[str], output_names: list[str],
                 precision: str = "f32") -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path, self.precision, self.threads = Path(path), precision, int(threads)
        try:
            self.interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads)
            self.runner = self.interpreter.get_signature_runner(SIGNATURE)
        except Exception as exc:
            raise MeasurementFailed(f"LiteRT could not load {self.path.name}: {_short(exc)}") from exc
        signature = self.interpreter.get_signature_list()[SIGNATURE]
        self._input_keys = signature_names(list(signature["inputs"]), input_names, outputs=False)
        self._output_keys = signature_names(list(signature["outputs"]), output_names, outputs=True)
        inputs, outputs = self.runner.get_input_details(), self.runner.get_output_details()
        self._inputs = [self._port(name, inputs[key]) for name, key in self._input_keys.items()]
        self._outputs = [self._port(name, outputs[key]) for name, key in self._output_keys.items()]

    @staticmethod
    def _port(name: str, details: dict[str, Any]) -> Port:
        shape = [int(d) if d >= 0 else None for d in details.get("shape_signature", details["shape"])]
        return Port(name, shape, onnx_type(details["dtype"]))

    def get_inputs(self) -> list[Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[Port]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [f"LiteRT CPU ({self.precision})"]

    def run(self, output_names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            results = self.runner(**{key: feed[name] for name, key in self._input_keys.items()})
        except Exception as exc:
            raise MeasurementFailed(f"LiteRT could not run {self.path.name}: {_short(exc)}") from exc
        return [np.asarray(results[key]) for key in self._output_keys.values()]


def _short(exc: Exception, limit: int = 1500) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def litert_openers(paths: dict[str, Path], reference, *, precision: str,
                   threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The measurement's openers on the litert target (workers.measure.targets.load_target): baseline, the original
    on ONNX Runtime (`reference`); runtime, the original's f32 .tflite (exported once, workers.litert.job.float_export);
    result, the job's .tflite. And the memory probe's engine for the result."""
    from workers.litert.job import float_export

    onnx_session = reference()
    inputs, outputs = [i.name for i in onnx_session.get_inputs()], [o.name for o in onnx_session.get_outputs()]
    try:
        runtime_model = float_export(paths["baseline"])
    except Exception as exc:  # JobFailed from the export: the measurement says it cannot run the runtime role
        raise MeasurementFailed(f"the original could not be exported to LiteRT at f32 to measure LiteRT's own gain: "
                                f"{getattr(exc, 'message', exc)}") from exc

    def on_litert(path: Path, at: str):
        return lambda: LiteRTSession(path, threads=threads, input_names=inputs, output_names=outputs, precision=at)

    openers = {"baseline": reference, "runtime": on_litert(runtime_model, "f32"),
               "result": on_litert(paths["result"], precision)}
    return openers, {"litert": {"precision": precision, "device": "CPU", "inputs": inputs}}
