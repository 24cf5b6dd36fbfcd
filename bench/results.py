"""What every benchmark does last: name the machine, print the table, append both to bench/RESULTS.md."""
from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    from workers.measure.environment import describe

    env = describe(provider="CPUExecutionProvider", threads=0)
    return f"{env['cpu']}, {env.get('logical_cores')} logical cores, onnxruntime {env['onnxruntime']}"


def publish(title: str, how: str, table: str, *, started: float, write: bool) -> None:
    """Print `table`; unless write is false, append it under `title` with the command, `how` and the machine."""
    where = machine()
    print(table)
    print(where, f"({time.time() - started:.0f} s)")
    if write:
        script = Path(sys.argv[0]).name
        with open(RESULTS, "a") as fh:
            fh.write(f"\n## {title} — {dt.date.today().isoformat()}\n\n"
                     f"`.venv/bin/python bench/{script} {' '.join(sys.argv[1:])}`. {how}\n\n"
                     f"Machine: {where}\n\n{table}\n")
