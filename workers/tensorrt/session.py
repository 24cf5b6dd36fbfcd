"""A TensorRT engine run through its own execution context, behind the interface the measurement harness drives
(get_inputs, get_outputs, get_providers, run) plus `bind`: the harness's I/O-bound call, with inputs copied to
the device once, outputs left there and each call ended by a stream synchronisation (as ONNX Runtime's I/O
binding does for the CUDA and TensorRT execution providers).

Buffers are torch CUDA tensors (the GPU worker's torch is a CUDA build); the engine is given their addresses
(set_tensor_address) and run with execute_async_v3 on a torch stream.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import MeasurementFailed
from workers.openvino.session import Port
from workers.tensorrt.engine import read_meta

# numpy dtype name -> ONNX Runtime's type string (what workers.onnx_tools.inputs and fidelity read).
ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
              "int32": "tensor(int32)", "int8": "tensor(int8)", "uint8": "tensor(uint8)", "bool": "tensor(bool)"}


def _torch_dtype(dtype: np.dtype):
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class TensorRTSession:
    """The engine at `path`, deserialized on CUDA device 0. `label`: how reports name it ("TensorRT CUDA (f16)")."""

    def __init__(self, path: Path, *, label: str) -> None:
        import tensorrt as trt
        import torch

        self.path, self.label = Path(path), label
        self._trt, self._torch = trt, torch
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            meta = read_meta(self.path)
            built = f" (built with TensorRT {meta.get('tensorrt')} on {meta.get('gpu')})" if meta else ""
            raise MeasurementFailed(f"TensorRT {trt.__version__} could not load the engine {self.path.name}{built} "
                                    f"on {torch.cuda.get_device_name(0)}: an engine runs only on the GPU model and "
                                    "TensorRT version it was built with", code="measurement_failed")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._inputs = [self._port(n) for n in names if is_input[n]]
        self._outputs = [self._port(n) for n in names if not is_input[n]]

    def _port(self, name: str) -> Port:
        shape = [None if int(d) < 0 else int(d) for d in self.engine.get_tensor_shape(name)]
        kind = self._dtypes[name].name
        return Port(name, shape, ONNX_TYPES.get(kind, f"tensor({kind})"))

    def get_inputs(self) -> list[Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[Port]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [self.label]

    def _prepare(self, feed: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Device copies of the inputs and output buffers at the shapes they give; addresses set on the context."""
        torch = self._torch
        device_inputs = {}
        for port in self._inputs:
            array = np.ascontiguousarray(feed[port.name].astype(self._dtypes[port.name], copy=False))
            device_inputs[port.name] = torch.from_numpy(array).cuda()
            if not self.context.set_input_shape(port.name, tuple(array.shape)):
                raise MeasurementFailed(f"the TensorRT engine does not take input {port.name!r} at shape "
                                        f"{list(array.shape)}: it was built for the job's batch sizes")
        outputs = {}
        for port in self._outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(port.name))
            if any(d < 0 for d in shape):
                raise MeasurementFailed(f"TensorRT cannot tell the shape of output {port.name!r} before running "
                                        "(a data-dependent shape): this engine is not measured")
            outputs[port.name] = torch.empty(shape, dtype=_torch_dtype(self._dtypes[port.name]), device="cuda")
        for name, tensor in (device_inputs | outputs).items():
            self.context.set_tensor_address(name, int(tensor.data_ptr()))
        return device_inputs, outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise MeasurementFailed(f"TensorRT failed to run {self.path.name}")

    def run(self, output_names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Host arrays in, host arrays out (copies included), as InferenceSession.run."""
        with self._torch.cuda.stream(self.stream):
            _inputs, outputs = self._prepare(feed)
            self._execute()
        self.stream.synchronize()
        return [outputs[port.name].cpu().numpy() for port in self._outputs]

    def bind(self, feed: dict[str, np.ndarray]) -> Callable[[], None]:
        """A call on inputs already on the device, outputs left there, synchronised at its end."""
        with self._torch.cuda.stream(self.stream):
            buffers = self._prepare(feed)
        self.stream.synchronize()
        return _BoundEngineCall(self, buffers)


class _BoundEngineCall:
    """One timed call of a bound engine; it holds the device buffers (and the shapes set for them) while it lives.
    The context's tensor addresses are set again on each call: another bound call on the same session may have
    moved them."""

    def __init__(self, session: TensorRTSession, buffers: tuple[dict[str, Any], dict[str, Any]]) -> None:
        self.session, self.buffers = session, buffers
        self.shapes = {name: tuple(t.shape) for name, t in buffers[0].items()}

    def __call__(self) -> None:
        session = self.session
        for name, shape in self.shapes.items():
            session.context.set_input_shape(name, shape)
        for name, tensor in (self.buffers[0] | self.buffers[1]).items():
            session.context.set_tensor_address(name, int(tensor.data_ptr()))
        session._execute()
        session.stream.synchronize()
