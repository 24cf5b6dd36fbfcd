"""`make gpu-check`: everything ModelPress claims about NVIDIA GPUs, checked on the one this runs on.

1. the CUDA kernels built (`make kernels`) and tested against their references (tests/kernels);
2. bench/kernels.py against the device-to-device copy bandwidth it measures in the same run (goal: >= 80%);
3. YOLOX-nano (and the other ../shared/models) on every GPU way this machine has: ONNX Runtime's CUDA provider
   (f32, fp16 model) and TensorRT provider (fp16, int8 from a QDQ model), all I/O-bound, and TensorRT's own
   execution context (f16, int8 engines with entropy calibration); each against the original's f32 run on the same
   provider in interleaved ABBA rounds, with the speedup's interval (workers.measure.stats), and NVML energy in
   J/inference over >= 1 s windows (workers.measure.energy);
4. one job end to end on the embedded stack (`modelpress run`: API + a worker that serves the GPU targets);
5. the rows appended to bench/RESULTS.md with the device name.

What a part needs and this machine lacks (onnxruntime-gpu, tensorrt, the service's packages, the models) is said
in one line and that part is skipped; nothing is installed from an index (a lent GPU machine may have none).
Without an NVIDIA GPU it says so and exits 0. Exit 1 when a check that ran failed (a kernel test, a crash).

    python bench/gpu_check.py [--no-write] [--models DIR] [--iterations 200] [--skip kernels,bench,providers,job]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.measure.environment import gpu_names  # noqa: E402 - after the path is set; needs only numpy (torch brings it)

PARTS = ("kernels", "bench", "providers", "job")
BANDWIDTH_GOAL = 0.80
SERVICE_MODULES = ("fastapi", "uvicorn", "celery", "kombu", "sqlalchemy", "alembic", "pydantic", "pydantic_settings",
                   "httpx", "multipart", "cryptography")


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def inventory() -> dict[str, Any]:
    """What this machine has for each part, and what it lacks."""
    found: dict[str, Any] = {"python": sys.executable, "nvcc": shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)}
    try:
        import torch

        found["torch"] = torch.__version__
        found["torch_cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    except ImportError:
        found["torch"] = None
    try:
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
        found["ort_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        found["onnxruntime"], found["ort_providers"] = None, []
    try:
        import tensorrt

        found["tensorrt"] = tensorrt.__version__
    except ImportError as exc:
        found["tensorrt"], found["tensorrt_reason"] = None, str(exc)
    found["pytest"] = has("pytest")
    found["service_missing"] = [m for m in SERVICE_MODULES if not has(m)]
    return found


def missing_lines(inv: dict[str, Any]) -> list[str]:
    lines = []
    if not inv.get("nvcc"):
        lines.append("nvcc: not found, the kernels cannot be built")
    if not inv.get("torch_cuda"):
        lines.append(f"torch with CUDA: not here (torch {inv.get('torch')})")
    if "CUDAExecutionProvider" not in inv.get("ort_providers", []):
        lines.append(f"onnxruntime-gpu: not here (onnxruntime {inv.get('onnxruntime')} offers "
                     f"{', '.join(inv.get('ort_providers') or []) or 'nothing'}): the CUDA and TensorRT providers "
                     "are not measured")
    elif "TensorrtExecutionProvider" not in inv.get("ort_providers", []):
        lines.append("onnxruntime's TensorrtExecutionProvider: not in this build")
    if not inv.get("tensorrt"):
        lines.append(f"tensorrt (Python): not here ({inv.get('tensorrt_reason')}): no engines are built")
    if inv.get("service_missing"):
        lines.append(f"the service's packages: {', '.join(inv['service_missing'])} missing: no job end to end")
    return lines


# --- 1 and 2: kernels -------------------------------------------------------------------------------------------

def check_kernels(inv: dict[str, Any], failures: list[str]) -> list[str]:
    rows = []
    if not inv.get("nvcc"):
        return ["| kernels | not built | nvcc is missing |"]
    done = subprocess.run(["make", "--no-print-directory", "kernels", f"NVCC={inv['nvcc']}"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        failures.append("make kernels failed: " + done.stderr[-1500:])
        return ["| kernels | build failed | " + " ".join(done.stderr.split())[-300:] + " |"]
    if not inv.get("pytest"):
        return ["| kernels | built, not tested | pytest is missing |"]
    # --noconftest: the suite's conftest starts services this machine may lack; the kernel tests need none.
    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
                             "tests/kernels", "-rs"], cwd=ROOT, capture_output=True, text=True)
    summary = (tested.stdout.strip().splitlines() or ["no output"])[-1]
    print(tested.stdout[-3000:])
    if tested.returncode != 0:
        failures.append(f"tests/kernels: {summary}")
    rows.append(f"| kernels vs references (tests/kernels) | {'passed' if tested.returncode == 0 else 'FAILED'} | "
                f"{summary} |")
    if inv.get("service_missing"):  # they import the service's schemas
        rows.append(f"| GPU targets (tests/workers/test_gpu_targets.py) | skipped | missing "
                    f"{', '.join(inv['service_missing'])} |")
        return rows
    gpu = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", "-rs",
                          "tests/workers/test_gpu_targets.py"], cwd=ROOT, capture_output=True, text=True)
    print(gpu.stdout[-3000:])
    gpu_summary = (gpu.stdout.strip().splitlines() or ["no output"])[-1]
    if gpu.returncode != 0:
        failures.append(f"tests/workers/test_gpu_targets.py: {gpu_summary}")
    rows.append(f"| GPU targets (tests/workers/test_gpu_targets.py) | {'passed' if gpu.returncode == 0 else 'FAILED'}"
                f" | {gpu_summary} |")
    return rows


def check_kernel_bench(write: bool, failures: list[str]) -> list[str]:
    argv = [sys.executable, str(ROOT / "bench" / "kernels.py")] + ([] if write else ["--no-write"])
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    print(done.stdout[-6000:])
    if done.returncode != 0:
        failures.append(f"bench/kernels.py exited {done.returncode}: {done.stderr[-800:]}")
        return [f"| bench/kernels.py | exit {done.returncode} | {' '.join(done.stderr.split())[-300:]} |"]
    fractions = []
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[7].endswith("%"):
            try:
                fractions.append((cells[0], cells[1], float(cells[7].rstrip("%")) / 100))
            except ValueError:
                continue
    below = [f"{k} {s} {f:.0%}" for k, s, f in fractions if f < BANDWIDTH_GOAL]
    verdict = "met" if fractions and not below else "not met"
    return [f"| kernels at >= {BANDWIDTH_GOAL:.0%} of the measured copy bandwidth | {verdict} | "
            + ("below: " + ", ".join(below) if below else f"{len(fractions)} rows at or above") + " |"]


# --- 3: providers and engines on the shared models --------------------------------------------------------------

def models_folder(given: str | None) -> Path | None:
    for candidate in [given, os.environ.get("MODELPRESS_SHARED_MODELS"), ROOT.parent / "shared" / "models",
                      ROOT / "shared" / "models"]:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def ort_session(path: Path, providers: list[Any]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers)


def random_feed(session, batch: int, seed: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {i.name: rng.random([batch if not isinstance(d, int) else d for d in i.shape], dtype=np.float32)
            for i in session.get_inputs()}


def ways(model: Path, work: Path, inv: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """name -> opener of (session, bound call maker); and what could not be set up, with why."""
    from workers.measure.latency import bound_call

    opened: dict[str, Any] = {}
    skipped: list[str] = []
    providers = inv.get("ort_providers", [])
    if "CUDAExecutionProvider" in providers:
        opened["ort-cuda-f32"] = lambda: ort_session(model, ["CUDAExecutionProvider"])
        try:
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            fp16 = work / "model_fp16.onnx"
            onnx.save(convert_float_to_float16(onnx.load(str(model)), keep_io_types=True), str(fp16))
            opened["ort-cuda-fp16"] = lambda: ort_session(fp16, ["CUDAExecutionProvider"])
        except Exception as exc:  # the conversion is ONNX Runtime's; a model it cannot convert is a finding
            skipped.append(f"ort-cuda-fp16: {type(exc).__name__}: {exc}"[:300])
    if "TensorrtExecutionProvider" in providers:
        cache = work / "trt-cache"
        cache.mkdir(exist_ok=True)

        def trt_ep(path: Path, **flags: Any):
            options = {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                       "trt_timing_cache_enable": True, **flags}
            return lambda: ort_session(path, [("TensorrtExecutionProvider", options), "CUDAExecutionProvider"])

        opened["ort-trt-fp16"] = trt_ep(model, trt_fp16_enable=True)
        qdq = qdq_model(model, work, skipped)
        if qdq is not None:
            opened["ort-trt-int8"] = trt_ep(qdq, trt_int8_enable=True, trt_fp16_enable=True)
    if inv.get("tensorrt") and inv.get("torch_cuda"):
        from workers.tensorrt.engine import build_engine
        from workers.tensorrt.job import engine_plan
        from workers.tensorrt.session import TensorRTSession

        profile = engine_plan(model, None, [1])
        for precision in ("f32", "f16", "int8"):
            try:
                engine, meta = build_engine(model, work / f"engine-{precision}", precision=precision, profile=profile,
                                            calibration=lambda: (calibration_feeds(model), "random data", []))
                opened[f"trt-{precision}"] = (lambda e=engine, p=precision: TensorRTSession(e, label=f"TensorRT {p}"))
                print(f"  built {engine.name} in {meta.build_s} s ({meta.int8_source or precision})")
            except Exception as exc:
                skipped.append(f"trt-{precision}: {type(exc).__name__}: {exc}"[:400])
    return {"opened": opened, "bind": bound_call}, skipped


def calibration_feeds(model: Path, count: int = 32) -> list[dict[str, Any]]:
    session = ort_session(model, ["CPUExecutionProvider"])
    return [random_feed(session, 1, seed) for seed in range(count)]


def qdq_model(model: Path, work: Path, skipped: list[str]) -> Path | None:
    from workers.tensorrt.engine import _ort_entropy_qdq

    try:
        return _ort_entropy_qdq(model, calibration_feeds(model), work / "model_qdq.onnx")
    except Exception as exc:
        skipped.append(f"ort-trt-int8 (QDQ model): {type(exc).__name__}: {exc}"[:300])
        return None


def measure_ways(model: Path, inv: dict[str, Any], iterations: int, failures: list[str]) -> list[str]:
    """Each way against its reference (ort-cuda-f32 for ONNX Runtime's, trt-f32 for TensorRT's), ABBA rounds."""
    from workers.measure.energy import measure_windows, nvml_counter
    from workers.measure.latency import choose_rounds, round_order, split, time_calls
    from workers.measure.stats import show_speedup, speedup_interval

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        found, skipped = ways(model, Path(folder), inv)
        opened, bind = found["opened"], found["bind"]
        rows += [f"| {model.stem} | {s.split(':')[0]} | not measured | {s} | | |" for s in skipped]
        counter, counter_reason = nvml_counter()
        pairs = [(w, "ort-cuda-f32") for w in ("ort-cuda-f32", "ort-cuda-fp16", "ort-trt-fp16", "ort-trt-int8")
                 if w in opened] + [(w, "trt-f32") for w in ("trt-f32", "trt-f16", "trt-int8") if w in opened]
        for way, reference in pairs:
            if reference not in opened:
                rows.append(f"| {model.stem} | {way} | not measured | its reference {reference} did not open | | |")
                continue
            try:
                sessions = {"baseline": opened[reference](), "result": opened[way]()}
                feed = random_feed(sessions["baseline"], 1, 0)
                calls = {role: bind(s, feed) for role, s in sessions.items()}
                for role in calls:
                    time_calls(calls[role], 20)
                rounds: dict[str, list[list[int]]] = {"baseline": [], "result": []}
                for index, count in enumerate(split(iterations, choose_rounds(iterations))):
                    for role in round_order(index):
                        rounds[role].append([])
                        time_calls(calls[role], count, rounds[role][-1])
                interval = speedup_interval(rounds["baseline"], rounds["result"], seed=0)
                p50 = statistics.median(t for r in rounds["result"] for t in r)
                energy = "n/a: " + counter_reason if counter is None else ""
                if counter is not None:
                    totals = measure_windows(counter, calls)
                    per = {role: t["joules"] / t["calls"] for role, t in totals.items()}
                    energy = f"{per['result']:.3g} J (reference {per['baseline']:.3g} J)"
                rows.append(f"| {model.stem} | {way} | {p50 / 1e6:.3f} ms | vs {reference}: {show_speedup(interval)} "
                            f"| {energy} | {sessions['result'].get_providers()[0]} |")
            except Exception as exc:
                failures.append(f"{model.stem} {way}: {type(exc).__name__}: {exc}"[:500])
                rows.append(f"| {model.stem} | {way} | failed | {type(exc).__name__}: {str(exc)[:200]} | | |")
    return rows


# --- 4: one job end to end ----------------------------------------------------------------------------------------

def check_job(model: Path | None, inv: dict[str, Any], failures: list[str]) -> list[str]:
    if inv.get("service_missing"):
        return [f"| job end to end | skipped | missing {', '.join(inv['service_missing'])} |"]
    if model is None:
        return ["| job end to end | skipped | no model folder (--models) |"]
    target = {"runtime": "tensorrt", "device": "cuda", "precision": "f16"} if inv.get("tensorrt") else \
        {"runtime": "onnxruntime", "device": "cuda"} if "CUDAExecutionProvider" in inv.get("ort_providers", []) else None
    if target is None:
        return ["| job end to end | skipped | neither TensorRT nor ONNX Runtime's CUDA provider is here |"]
    from app.client import Client
    from bench.common import free_port, wait_ready

    with tempfile.TemporaryDirectory(prefix="gpu-check-job-") as folder:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
        env.update(MODELPRESS_DATA_DIR=folder, PYTHONUNBUFFERED="1", MODELPRESS_WORKER_TARGETS="auto")
        cli = [sys.executable, "-c", "from app.cli import main; main()"]
        made = subprocess.run(cli + ["keys", "create", "--tenant", "gpu-check"], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        if made.returncode != 0 or "api key: " not in made.stdout:
            failures.append(f"job: keys create failed: {made.stderr[-500:]}")
            return ["| job end to end | failed | could not create a key |"]
        key = made.stdout.split("api key: ")[1].split()[0]
        port = free_port()
        log = open(Path(folder) / "run.log", "w")
        service = subprocess.Popen(cli + ["run", "--port", str(port)], env=env, cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, [service])
            client = Client(base, key, timeout=120)
            uploaded = client.upload_model(model)
            steps = None if target["runtime"] == "tensorrt" else [{"method": "quantize.fp16", "params": {}}]
            job = client.submit_job(uploaded["id"], steps=steps, target=target,
                                    evaluate={"batch_sizes": [1], "warmup": 10, "iterations": 100})
            done = client.wait(job["id"], timeout_s=1200)
            summary = (client.report(job["id"]) if done["status"] == "succeeded" else {}).get("summary", {})
            if done["status"] != "succeeded":
                failures.append(f"job {job['id']}: {done['status']}: {(done.get('error') or {}).get('message')}")
            return [f"| job end to end ({'/'.join(str(v) for v in target.values())}) | {done['status']} | "
                    f"speedup {json.dumps(summary.get('speedup_ci') or summary.get('speedup'))}, energy "
                    f"{json.dumps(summary.get('energy_j_per_inference'))} |"]
        except Exception as exc:
            failures.append(f"job: {type(exc).__name__}: {exc}"[:800])
            log.flush()
            print((Path(folder) / "run.log").read_text()[-4000:])
            return [f"| job end to end | failed | {type(exc).__name__}: {str(exc)[:200]} |"]
        finally:
            service.terminate()
            try:
                service.wait(timeout=30)
            except subprocess.TimeoutExpired:
                service.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    parser.add_argument("--models", help="folder of the shared models (default: ../shared/models, ./shared/models)")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--skip", default="", help=f"comma-separated parts to skip: {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    names = gpu_names()
    if not names:
        print("make gpu-check needs an NVIDIA GPU, and nvidia-smi lists none on this machine: nothing was checked, "
              "nothing written.")
        return 0
    started = time.time()
    skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    inv = inventory()
    print(f"GPU: {', '.join(names)}")
    print("inventory: " + json.dumps({k: v for k, v in inv.items() if k != "service_missing"}))
    for line in missing_lines(inv):
        print("missing: " + line)
    failures: list[str] = []
    checks: list[str] = []
    if "kernels" not in skip:
        checks += check_kernels(inv, failures)
    if "bench" not in skip and inv.get("torch_cuda"):
        checks += check_kernel_bench(not args.no_write, failures)
    folder = models_folder(args.models)
    measured: list[str] = []
    if "providers" not in skip:
        if folder is None:
            checks.append("| providers on the shared models | skipped | no model folder (--models, "
                          "MODELPRESS_SHARED_MODELS, ../shared/models) |")
        else:
            for model in sorted(folder.glob("*/*.onnx")):
                print(f"measuring {model.name} ...")
                measured += measure_ways(model, inv, args.iterations, failures)
    yolox = next(iter(sorted(folder.glob("yolox*/*.onnx"))), None) if folder else None
    if "job" not in skip:
        checks += check_job(yolox, inv, failures)
    table = "\n".join(["| check | result | detail |", "| --- | --- | --- |", *checks])
    if measured:
        table += "\n\n" + "\n".join(["| model | way | p50 (batch 1, I/O bound) | speedup (95% interval) | "
                                     "energy per inference (NVML, 2 x >= 1 s windows) | ran on |",
                                     "| --- | --- | --- | --- | --- | --- |", *measured])
    missing = missing_lines(inv)
    how = (f"GPU: {', '.join(names)}; torch {inv.get('torch')} (CUDA {inv.get('torch_cuda')}), onnxruntime "
           f"{inv.get('onnxruntime')} ({', '.join(inv.get('ort_providers') or [])}), tensorrt {inv.get('tensorrt')}. "
           f"Each way against its f32 reference on the same runtime, {args.iterations} calls each in interleaved "
           "ABBA rounds at batch 1 on random inputs, inputs bound on the device. Missing here: "
           + ("; ".join(missing) if missing else "nothing"))
    from bench.results import publish

    publish(f"make gpu-check on {names[0]}", how, table, started=started, write=not args.no_write)
    for failure in failures:
        print("FAILED: " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
