"""Child process: how much resident memory one model's session adds while it loads and runs.

Standalone on purpose (numpy and onnxruntime only), so its own imports are
done before the peak is reset and nothing else shares the process.

    python -P _rss_probe.py MODEL FEEDS.npz PROVIDERS_JSON THREADS RUNS
"""
import json
import sys


def status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def reset_peak() -> bool:
    """Reset VmHWM (the peak) to the current resident size; False (with the error printed) where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError as exc:
        print(json.dumps({"error": f"cannot reset the peak-RSS mark (/proc/self/clear_refs): {exc}"}))
        return False
    return True


def device_used_bytes():
    """(bytes in use on GPU 0 by everyone, None) from NVML, or (None, why not)."""
    import ctypes

    class Memory(ctypes.Structure):
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        handle, memory = ctypes.c_void_p(), Memory()
        if lib.nvmlInit_v2() != 0 or lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) != 0:
            return None, "NVML could not be initialised"
        if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
            return None, "nvmlDeviceGetMemoryInfo failed"
        return memory.used, None
    except (OSError, AttributeError) as exc:
        return None, f"NVML is not available: {exc}"


def main() -> None:
    model, feeds_path, providers, threads, runs = sys.argv[1:6]
    import numpy as np

    if isinstance(json.loads(providers), dict) and "tensorrt" in json.loads(providers):
        tensorrt_main(model, feeds_path, int(runs))
        return
    if isinstance(json.loads(providers), dict) and "litert" in json.loads(providers):
        litert_main(model, feeds_path, int(threads), int(runs))
        return
    if isinstance(json.loads(providers), dict):
        openvino_main(model, feeds_path, json.loads(providers)["openvino"], int(threads), int(runs))
        return
    import onnxruntime as ort

    with np.load(feeds_path) as data:
        feeds = {name: data[name] for name in data.files}
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    before = status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (the peak) to the current resident size
    except OSError as exc:
        print(json.dumps({"error": f"cannot reset the peak-RSS mark (/proc/self/clear_refs): {exc}"}))
        return
    on_device = json.loads(providers)[0] != "CPUExecutionProvider"
    device_before, device_reason = device_used_bytes() if on_device else (None, None)
    session = ort.InferenceSession(model, sess_options=options, providers=json.loads(providers))
    for _ in range(int(runs)):
        session.run(None, feeds)
    found: dict[str, int | str | None] = {
        "peak_rss_increase_bytes": status_bytes("VmHWM") - before,
        "retained_rss_increase_bytes": status_bytes("VmRSS") - before,
    }
    if on_device:
        device_after, reason = device_used_bytes() if device_before is not None else (None, device_reason)
        found["device_memory_increase_bytes"] = None if device_after is None else device_after - device_before
        found["device_memory_reason"] = reason
    print(json.dumps(found))


def openvino_main(model: str, feeds_path: str, config: dict, threads: int, runs: int) -> None:
    """The same figure for a model on OpenVINO's CPU plugin (the IR or ONNX file compiled at config's precision)."""
    import numpy as np
    import openvino as ov

    hints = {"f32": "f32", "bf16": "bf16", "int8": "f32", "int8_bf16": "bf16"}  # as workers.openvino.session.PRECISION_HINTS
    with np.load(feeds_path) as data:
        feeds = {name: data[name] for name in data.files}
    core = ov.Core()
    before = status_bytes("VmRSS")
    if not reset_peak():
        return
    read = core.read_model(model)
    read.reshape({port.get_any_name(): list(feeds[name].shape) for port in read.inputs
                  for name in port.get_names() if name in feeds})
    compiled = core.compile_model(read, config.get("device", "CPU"), {
        "INFERENCE_PRECISION_HINT": hints[config["precision"]], "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False})
    request = compiled.create_infer_request()
    by_port = [next(feeds[n] for n in port.get_names() if n in feeds) for port in compiled.inputs]
    for _ in range(runs):
        request.infer(by_port)
    print(json.dumps({"peak_rss_increase_bytes": status_bytes("VmHWM") - before,
                      "retained_rss_increase_bytes": status_bytes("VmRSS") - before}))


def tensorrt_main(model: str, feeds_path: str, runs: int) -> None:
    """The same figures for a TensorRT engine run through its execution context (host and device memory); torch
    stages the buffers, as workers.tensorrt.session does."""
    import numpy as np
    import tensorrt as trt
    import torch

    with np.load(feeds_path) as data:
        feeds = {name: data[name] for name in data.files}
    torch.cuda.init()
    before = status_bytes("VmRSS")
    if not reset_peak():
        return
    device_before, device_reason = device_used_bytes()
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(open(model, "rb").read())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    buffers = {}
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            buffers[name] = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            context.set_input_shape(name, tuple(feeds[name].shape))
    for name in names:
        if name not in buffers:
            dtype = torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, int(buffers[name].data_ptr()))
    stream = torch.cuda.Stream()
    for _ in range(runs):
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
    device_after, reason = device_used_bytes() if device_before is not None else (None, device_reason)
    print(json.dumps({"peak_rss_increase_bytes": status_bytes("VmHWM") - before,
                      "retained_rss_increase_bytes": status_bytes("VmRSS") - before,
                      "device_memory_increase_bytes": None if device_after is None else device_after - device_before,
                      "device_memory_reason": reason}))


def litert_main(model: str, feeds_path: str, threads: int, runs: int) -> None:
    """The same figure for a .tflite model on LiteRT's CPU interpreter, called through its signature as
    workers.litert.session does (inputs by the ONNX names, which the signature keeps)."""
    import re

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    with np.load(feeds_path) as data:
        feeds = {name: data[name] for name in data.files}
    before = status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError as exc:
        print(json.dumps({"error": f"cannot reset the peak-RSS mark (/proc/self/clear_refs): {exc}"}))
        return
    runner = Interpreter(model_path=model, num_threads=threads).get_signature_runner("serving_default")
    keys = set(runner.get_input_details())
    single = next(iter(keys)) if len(keys) == 1 and len(feeds) == 1 else None
    # onnx2tf may have sanitized a name (input.1 -> input_1), as workers.litert.session.signature_names matches it
    feed = {single: next(iter(feeds.values()))} if single else {
        name if name in keys else re.sub(r"[^A-Za-z0-9_]", "_", name): array for name, array in feeds.items()}
    for _ in range(runs):
        runner(**feed)
    print(json.dumps({"peak_rss_increase_bytes": status_bytes("VmHWM") - before,
                      "retained_rss_increase_bytes": status_bytes("VmRSS") - before}))


if __name__ == "__main__":
    main()
