"""The regression gate's power and false-alarm rate (POST /v1/gates, workers/gate.py), on this machine.

A real model (ultraface-rfb320 from ../shared/models) is made slower in a controlled way: a chain of Tanh ops on
its input, reduced to a scalar, multiplied by 0 and added to its first output (the outputs stay the same to the
bit; ONNX Runtime folds none of it). The chain's length is calibrated so that the candidate is 5% slower, and that
slowdown is then measured on its own, for longer than a gate runs, and printed with its interval. Then N gates of
candidate against baseline (a true 5% regression) and N of the model against itself run the gate's latency
statistics in this process (workers.gate.compare_latency: the very function the worker calls), with the policy's
max_slowdown_pct (default 3) and time budget (default 60 s); plus a few gates through the API end to end (a
`modelpress run` service: API, worker, SQLite). The table gives the detection rate and the false-alarm rate with
their Clopper-Pearson 95% intervals, and the time per gate; it is appended to bench/RESULTS.md with the machine.

    .venv/bin/python bench/gate.py                 # N = 20 of each, max_slowdown 3%, 60 s budget
    .venv/bin/python bench/gate.py --n 60 --limit 2 --e2e 4
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = ROOT.parent / "shared" / "models" / "ultraface-rfb320" / "version-RFB-320.onnx"
TARGET = 0.05


def slowed(source: Path, ops: int, dest: Path) -> Path:
    """`source` with `ops` Tanh ops on its first input, reduced, times 0, added to its first output."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(source))
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    data_input = next(i.name for i in graph.input if i.name not in initializers)
    first_output = graph.output[0].name
    current = data_input
    for index in range(ops):
        graph.node.append(helper.make_node("Tanh", [current], [f"gate_pad_{index}"]))
        current = f"gate_pad_{index}"
    graph.node.append(helper.make_node("ReduceMean", [current], ["gate_pad_mean"], keepdims=0))
    graph.initializer.append(helper.make_tensor("gate_pad_zero", TensorProto.FLOAT, [], [0.0]))
    graph.node.append(helper.make_node("Mul", ["gate_pad_mean", "gate_pad_zero"], ["gate_pad_nothing"]))
    # The first output now comes out of an Add: the node that wrote it writes a renamed tensor.
    for node in graph.node:
        for position, name in enumerate(node.output):
            if name == first_output:
                node.output[position] = "gate_pad_before"
    graph.node.append(helper.make_node("Add", ["gate_pad_before", "gate_pad_nothing"], [first_output]))
    onnx.save(model, str(dest))
    return dest


def measure(paths: dict[str, Path], *, limit: float | None, budget_s: float, threads: int, early: bool = True,
            seed: int = 0) -> dict:
    from workers.gate import compare_latency, plan_pair

    plan, sessions, _pairs, _notes = plan_pair(paths, None, threads)
    del sessions
    feeds = plan.feeds(1, np.random.default_rng([0, 0, 1]))
    return compare_latency(paths, feeds, limit=limit, budget_s=budget_s, threads=threads, early=early, seed=seed)


def clopper_pearson(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact binomial interval (each tail (1 - confidence) / 2), by bisection on the binomial tails."""
    from math import comb

    def at_most(k: int, p: float) -> float:
        return sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))

    def solve(too_low) -> float:
        low, high = 0.0, 1.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if too_low(middle) else (low, middle)
        return (low + high) / 2

    tail = (1 - confidence) / 2
    low = 0.0 if hits == 0 else solve(lambda p: 1 - at_most(hits - 1, p) < tail)
    high = 1.0 if hits == n else solve(lambda p: at_most(hits, p) > tail)
    return low, high


def calibrate(baseline: Path, folder: Path, threads: int, seconds: float) -> tuple[Path, int, dict]:
    """The chain length that makes the model 5% slower, from the slowdown of a long chain; then that
    candidate's slowdown measured for `seconds` (the true slowdown the gates face)."""
    probe_ops = 40
    probe = measure({"baseline": baseline, "result": slowed(baseline, probe_ops, folder / "probe.onnx")}, limit=None,
                    budget_s=seconds / 2, threads=threads)
    per_op = max(probe["slowdown"] / probe_ops, 1e-5)
    ops = max(1, round(TARGET / per_op))
    candidate = slowed(baseline, ops, folder / "candidate.onnx")
    checked = measure({"baseline": baseline, "result": candidate}, limit=TARGET, budget_s=seconds, threads=threads,
                      early=False)
    if abs(checked["slowdown"] - TARGET) > 0.015:  # once more, from the candidate's own figure
        ops = max(1, round(ops * TARGET / max(checked["slowdown"], 1e-3)))
        candidate = slowed(baseline, ops, folder / "candidate.onnx")
        checked = measure({"baseline": baseline, "result": candidate}, limit=TARGET, budget_s=seconds,
                          threads=threads, early=False)
    return candidate, ops, checked


def run_in_process(pairs: dict[str, dict[str, Path]], n: int, limit: float, budget_s: float,
                   threads: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {name: [] for name in pairs}
    for index in range(n):
        for name, paths in pairs.items():  # alternated, so that load on the machine lands on both
            started = time.monotonic()
            found = measure(paths, limit=limit, budget_s=budget_s, threads=threads, seed=index)
            runs[name].append({"fail": found["decision"] == "fail", "seconds": time.monotonic() - started,
                               "slowdown": found["slowdown"], "decided": found["how"] == "decided"})
            print(f"  {name} #{index + 1}: {found['decision']} ({found['how']}), slowdown {100 * found['slowdown']:+.2f}% "
                  f"in {runs[name][-1]['seconds']:.1f} s", flush=True)
    return runs


def run_end_to_end(pairs: dict[str, dict[str, Path]], n: int, limit_pct: float, budget_s: float,
                   folder: Path) -> dict[str, list[dict]]:
    """`n` gates of each pair through a `modelpress run` service (API, worker, SQLite): POST, wait, verdict."""
    from app.client import Client
    from bench.common import free_port, wait_ready

    data, port = folder / "service", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")} | {
        "MODELPRESS_DATA_DIR": str(data), "PYTHONUNBUFFERED": "1"}
    binary = Path(sys.executable).parent / "modelpress"
    runs: dict[str, list[dict]] = {name: [] for name in pairs}
    with open(folder / "service.log", "w") as log:
        proc = subprocess.Popen([str(binary), "run", "--port", str(port)], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, [proc], timeout=120)
            with Client(url, (data / "api-key").read_text().strip(), timeout=120) as mp:
                ids = {path: mp.upload_model(path)["id"] for paths in pairs.values() for path in paths.values()}
                for _ in range(n):
                    for name, paths in pairs.items():
                        started = time.monotonic()
                        gate = mp.gate(ids[paths["result"]], baseline_model_id=ids[paths["baseline"]],
                                       max_slowdown_pct=limit_pct, time_budget_s=budget_s)
                        job = mp.wait(gate["id"], poll_s=0.5)
                        result = mp.gate_result(gate["id"])
                        runs[name].append({"fail": result["verdict"] == "fail", "status": job["status"],
                                           "seconds": time.monotonic() - started})
                        print(f"  end to end {name}: {result['verdict']} in {runs[name][-1]['seconds']:.1f} s "
                              f"({result['reason']})", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return runs


def rate_row(what: str, runs: list[dict], event: str) -> str:
    hits, n = sum(r["fail"] for r in runs), len(runs)
    low, high = clopper_pearson(hits, n)
    seconds = [r["seconds"] for r in runs]
    return (f"| {what} | {n} | {event} {hits}/{n} = {100 * hits / n:.0f}% ({100 * low:.0f}-{100 * high:.0f}%) | "
            f"{np.median(seconds):.1f} s | {max(seconds):.1f} s |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="gates of each kind run in process (default 20)")
    parser.add_argument("--limit", type=float, default=3.0, help="the policy's max_slowdown_pct (default 3)")
    parser.add_argument("--budget", type=float, default=60.0, help="the gate's time budget in s (default 60)")
    parser.add_argument("--calibrate-s", type=float, default=60.0, help="how long the true slowdown is measured")
    parser.add_argument("--e2e", type=int, default=1, help="gates of each kind through the API (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (default: the worker's default)")
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    if not MODEL.is_file():
        print(f"skipped: {MODEL} is absent (see ../shared/models/README.md)")
        return 0
    from bench.results import publish
    from workers.measure.environment import default_threads

    threads = args.threads or default_threads()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        folder = Path(tmp)
        baseline = folder / "baseline.onnx"
        shutil.copy(MODEL, baseline)
        itself = folder / "itself.onnx"  # the same bytes under another name: two sessions, as in a real gate
        shutil.copy(MODEL, itself)
        print(f"calibrating the 5% candidate ({args.calibrate_s:.0f} s of paired rounds) ...", flush=True)
        candidate, ops, truth = calibrate(baseline, folder, threads, args.calibrate_s)
        print(f"  {ops} Tanh ops: true slowdown {100 * truth['slowdown']:+.2f}% (one-sided 95% bounds "
              f"{100 * truth['low']:+.2f}% to {100 * truth['high']:+.2f}%)", flush=True)
        pairs = {"regression": {"baseline": baseline, "result": candidate},
                 "itself": {"baseline": baseline, "result": itself}}
        runs = run_in_process(pairs, args.n, args.limit / 100, args.budget, threads)
        e2e = run_end_to_end(pairs, args.e2e, args.limit, args.budget, folder) if args.e2e else {}
    table = "\n".join([
        f"True slowdown of the candidate: {100 * truth['slowdown']:+.2f}% (one-sided 95% bounds "
        f"{100 * truth['low']:+.2f}% to {100 * truth['high']:+.2f}%, {truth['rounds']} paired rounds in "
        f"{truth['seconds']:.0f} s; {ops} Tanh ops on the input of ultraface-rfb320, p50 "
        f"{truth['baseline']['p50_ms']:.3g} ms). Policy max_slowdown_pct {args.limit:g}, time budget "
        f"{args.budget:.0f} s, {threads} intra-op thread(s).",
        "",
        "| gates | n | fails (95% interval) | median time | longest |",
        "| --- | --- | --- | --- | --- |",
        rate_row("5% slower candidate, in process: power", runs["regression"], "detected"),
        rate_row("model against itself, in process: false alarms", runs["itself"], "false alarms"),
        *([rate_row("5% slower candidate, end to end (API + worker)", e2e["regression"], "detected"),
           rate_row("model against itself, end to end (API + worker)", e2e["itself"], "false alarms")]
          if e2e else []),
    ])
    how = ("The gate's latency statistics (workers.gate.compare_latency) run N times in process on a 5% slower "
           "ultraface-rfb320 and on the model against itself, alternating; end to end through `modelpress run`. "
           "Goal: power >= 95% for 5% within 60 s, false alarms <= 5%. The machine is shared: other processes ran "
           "beside it.")
    publish("Regression gate: power and false alarms", how, table, started=started, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
