"""What a job asks to be built for and measured on: a runtime on a device, at a precision.

The default target is today's: ONNX Runtime on the CPU, the steps deciding the precision. Each target maps to
one queue (`queue_for`); a worker consumes the queues of the targets it can serve, so a job reaches only
hardware that can run it.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Runtime = Literal["onnxruntime", "openvino", "tensorrt", "litert"]
Device = Literal["cpu", "cuda", "gpu", "npu"]
Precision = Literal["f32", "bf16", "f16", "int8", "int8_bf16"]

# The precisions each runtime's lowering knows (app.targets.schemas is all the API needs to check a spec).
RUNTIME_PRECISIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime": (),  # the steps decide (int8 QDQ, fp16, ...): no lowering after them
    # int8_bf16: NNCF int8, and bf16 for what stays float (OpenVINO's own default on a CPU with BF16)
    "openvino": ("f32", "bf16", "int8", "int8_bf16"),
    "tensorrt": ("f32", "f16", "int8"),
    "litert": ("f32", "f16", "int8"),
}
DEFAULT_PRECISION = {"openvino": "f32", "tensorrt": "f32", "litert": "f32"}


class TargetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runtime: Runtime = Field(default="onnxruntime", description="The runtime the result is built for and measured "
                             "on, always beside ONNX Runtime fp32 running the original on the same worker.")
    device: Device = Field(default="cpu", description="The device the runtime runs on.")
    precision: Precision | None = Field(
        default=None,
        description="Inference precision on the target runtime (openvino: f32, bf16 where the CPU has it, int8 "
        "through NNCF post-training quantization with the layers that stay float in f32, int8_bf16 the same with "
        "them in bf16, as OpenVINO compiles by default on a CPU with BF16; litert: f32, f16 weights, or "
        "full-integer int8 calibrated on a representative dataset, which it requires). Not for onnxruntime, where "
        "the steps decide. Default: f32.")
    calibration_dataset_id: str | None = Field(
        default=None, description="int8: the samples NNCF (openvino) or TFLite's converter (litert's "
        "representative dataset) calibrates on (a dataset from POST /v1/datasets). Default: the eval dataset's "
        "inputs, else random inputs at the job's input shapes on openvino; litert refuses int8 without samples "
        "(422 calibration_required).")
    calibration_samples: int = Field(default=300, ge=1, le=10_000,
                                     description="int8: calibrate on at most this many samples.")
    max_accuracy_drop: float | None = Field(
        default=None, gt=0, le=1,
        description="int8 with a labelled eval dataset: NNCF's accuracy-controlled quantization keeps the "
        "top-1 drop on that dataset within this (a fraction: 0.01 = one point) by reverting the most "
        "sensitive layers to float. Default 0.01 when the eval dataset has labels; without labels, plain "
        "post-training quantization.")

    @model_validator(mode="after")
    def _fits_runtime(self) -> TargetSpec:
        known = RUNTIME_PRECISIONS[self.runtime]
        if self.precision is not None and self.precision not in known:
            if not known:
                raise ValueError(f"precision is not set on the {self.runtime} target: its steps decide the precision "
                                 "(quantize.*, fp16 ...)")
            raise ValueError(f"the {self.runtime} target knows precisions {', '.join(known)}, not {self.precision}")
        int8_only = {"calibration_dataset_id": self.calibration_dataset_id, "max_accuracy_drop": self.max_accuracy_drop}
        for name, value in int8_only.items():
            if value is not None and not (self.effective_precision or "").startswith("int8"):
                raise ValueError(f"{name} is used only with precision int8")
        if self.max_accuracy_drop is not None and self.runtime != "openvino":
            raise ValueError("max_accuracy_drop is NNCF's accuracy control, on the openvino target only")
        return self

    @property
    def effective_precision(self) -> str | None:
        return self.precision or DEFAULT_PRECISION.get(self.runtime)

    @property
    def is_default(self) -> bool:
        return self.runtime == "onnxruntime" and self.device == "cpu"

    def key(self) -> tuple[str, str, str | None]:
        return self.runtime, self.device, self.effective_precision


def queue_for(runtime: str, device: str, precision: str | None) -> str:
    """The queue of a target (before the deployment's prefix). ONNX Runtime keeps the historic `cpu` and `gpu`
    queues; every other target has its own, which only workers that can serve it consume."""
    if runtime == "onnxruntime":
        return "gpu" if device in ("cuda", "gpu") else "cpu"
    return f"{runtime}.{device}" + (f".{precision}" if precision else "")


def target_name(runtime: str, device: str, precision: str | None) -> str:
    """openvino/cpu/bf16, onnxruntime/cpu: how messages and tables name a target."""
    return "/".join(part for part in (runtime, device, precision) if part)


class TargetDevice(BaseModel):
    name: str = Field(description="The device as its runtime names it (CPU model, GPU model).")
    isa: list[str] | None = Field(default=None, description="CPU: the ISA extensions that decide precisions' speed "
                                  "(avx2, avx512f, avx512_vnni, avx_vnni, avx512_bf16, amx_tile, amx_bf16, amx_int8).")
    memory_bytes: int | None = Field(default=None, description="GPU: its memory.")


class TargetPublic(BaseModel):
    runtime: str
    device: str
    precision: str | None = Field(description="null for onnxruntime: the job's steps decide the precision.")
    queue: str = Field(description="The queue jobs for this target are sent to.")
    default: bool = Field(description="The target of a job that names none (ONNX Runtime on the CPU).")
    workers: int = Field(description="Live workers serving it. The default target is listed with 0 too: its jobs "
                         "wait for a worker.")
    devices: list[TargetDevice] = Field(description="The distinct devices those workers run it on.")
    versions: dict[str, str] = Field(description="Runtime (and quantizer) versions on those workers; several "
                                     "versions are comma-separated.")


class WorkerPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str = Field(description="The Celery worker's node name.")
    host: str
    queues: list[str]
    targets: list[dict[str, Any]]
    capabilities: dict[str, Any] = Field(description="CPU (name, logical cores, ISA flags), memory, GPUs, and the "
                                         "runtimes found with their versions and devices.")
    started_at: dt.datetime
    last_seen_at: dt.datetime


class TargetsPublic(BaseModel):
    targets: list[TargetPublic]
    workers: list[WorkerPublic] = Field(description="The live workers: seen within MODELPRESS_WORKER_STALE_S.")
