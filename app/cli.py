"""`modelpress`: run the embedded service, the API or a worker; migrate; manage API keys;
and, as a client of a running service, compress models or optimize them to a goal, follow jobs and download
results."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from app.settings import get_settings

LOCAL_TENANT = "local"


def cmd_migrate(_args: argparse.Namespace) -> int:
    from app.migrate import upgrade

    upgrade()
    print("database schema is up to date")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from app.auth.service import create_key
    from app.db import session_scope
    from app.errors import ModelPressError

    expires_at = None
    if args.expires_in_days:
        expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(days=args.expires_in_days)
    try:
        with session_scope() as db:
            key, plaintext = create_key(db=db, tenant_name=args.tenant, scopes=args.scopes.split(","),
                                        expires_at=expires_at)
            key_id, scopes = key.id, key.scopes
    except ModelPressError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    expiry = f"\nexpires: {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else ""
    print(f"tenant: {args.tenant}\nkey id: {key_id}\nscopes: {','.join(scopes)}{expiry}\napi key: {plaintext}\n"
          "(the key is shown once; store it now)")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from app.auth.service import revoke_key
    from app.db import session_scope
    from app.errors import NotFound

    try:
        with session_scope() as db:
            key = revoke_key(db=db, key_id_or_plaintext=args.key)
            key_id = key.id
    except NotFound as exc:
        print(exc.message, file=sys.stderr)
        return 1
    print(f"revoked key {key_id}")
    return 0


def cmd_keys_list(_args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from app.db import session_scope
    from app.dbmodels import ApiKey

    with session_scope() as db:
        for key in db.scalars(select(ApiKey).order_by(ApiKey.created_at)):
            state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
            if key.expires_at and not key.revoked_at:
                state += f", expires {key.expires_at:%Y-%m-%d %H:%M}"
            print(f"{key.id}  {key.prefix}…  tenant={key.tenant.name}  scopes={','.join(key.scopes)}  {state}")
    return 0


def cmd_tenants_limits(args: argparse.Namespace) -> int:
    """Show or set one tenant's limits (empty: the server's default, 0: unlimited)."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.dbmodels import Tenant
    from app.limits import effective, stored_bytes

    settings = get_settings()
    with session_scope() as db:
        tenant = db.scalar(select(Tenant).where(Tenant.name == args.tenant))
        if tenant is None:
            print(f"no tenant named {args.tenant!r}", file=sys.stderr)
            return 1
        for field in ("max_concurrent_jobs", "max_stored_bytes", "requests_per_minute"):
            value = getattr(args, field)
            if value is not None:
                setattr(tenant, field, None if value < 0 else value)
        rows = [("max_concurrent_jobs", tenant.max_concurrent_jobs, settings.max_concurrent_jobs),
                ("max_stored_bytes", tenant.max_stored_bytes, settings.max_stored_bytes),
                ("requests_per_minute", tenant.requests_per_minute, settings.rate_limit_per_minute)]
        for field, own, default in rows:
            value = effective(own, default)
            origin = "tenant" if own is not None else "server default"
            print(f"{field}: {value or 'unlimited'} ({origin})")
        print(f"stored_bytes: {stored_bytes(db, tenant.id)}")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = get_settings()
    uvicorn.run("app.main:app", host=args.host or settings.api_host, port=args.port or settings.api_port,
                log_level=args.log_level, workers=args.workers, access_log=args.access_log)
    return 0


def worker_argv(queues: str, concurrency: int, loglevel: str) -> list[str]:
    settings = get_settings()
    names = ",".join(settings.queue_name(q.strip()) for q in queues.split(",") if q.strip())
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", names,
            "--concurrency", str(concurrency), "--loglevel", loglevel, "-n", f"modelpress-{os.getpid()}@%h"]
    if settings.celery_broker_url.startswith("filesystem"):
        # The filesystem transport has no broadcast: no mingle, gossip or heartbeats.
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    return argv


def cmd_worker(args: argparse.Namespace) -> int:
    argv = worker_argv(args.queues, args.concurrency, args.loglevel)
    if args.beat:
        argv += ["--beat", "--schedule", str(get_settings().data_path / "celerybeat-schedule")]
    os.execv(argv[0], argv)
    return 0  # pragma: no cover


def local_api_key() -> str:
    """The embedded default's key: created on first run, kept in the data folder, reused after."""
    from sqlalchemy import select

    from app.auth.service import create_key, hash_key
    from app.db import session_scope
    from app.dbmodels import ApiKey

    key_file = get_settings().data_path / "api-key"
    if key_file.is_file():
        plaintext = key_file.read_text().strip()
        with session_scope() as db:
            key = db.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext)))
            if key is not None and key.revoked_at is None:
                return plaintext
    with session_scope() as db:
        _key, plaintext = create_key(db=db, tenant_name=LOCAL_TENANT)
    key_file.write_text(plaintext + "\n")
    key_file.chmod(0o600)
    return plaintext


def cmd_run(args: argparse.Namespace) -> int:
    """Embedded default: migrate, make sure there is a key, start the API and one worker."""
    from app.migrate import upgrade

    settings = get_settings()
    settings.data_path.mkdir(parents=True, exist_ok=True)
    upgrade()  # (the API and the worker each clean store/tmp as they start)
    key = local_api_key()
    host, port = args.host or settings.api_host, args.port or settings.api_port
    env = {**os.environ, "MODELPRESS_DATA_DIR": str(settings.data_path)}
    # The worker also runs Celery beat (-B): the embedded deployment has one worker, so one scheduler.
    beat = ["--beat", "--schedule", str(settings.data_path / "celerybeat-schedule")]
    worker = subprocess.Popen(worker_argv("gpu,cpu", 1, "info") + beat, env=env)
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", host, "--port", str(port),
                            "--log-level", "warning"], env=env)
    print(f"\nModelPress is running (embedded: data in {settings.data_path})\n"
          f"  URL:     http://{host}:{port}   (API docs: http://{host}:{port}/docs)\n"
          f"  API key: {key}\n"
          f"  try:     curl -H 'Authorization: Bearer {key}' http://{host}:{port}/v1/methods\n"
          f"Ctrl-C stops it.\n", flush=True)
    children = [api, worker]

    def stop(*_):
        for child in children:
            if child.poll() is None:
                child.terminate()

    signal.signal(signal.SIGTERM, stop)
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    failed = [c for c in children if c.returncode not in (0, -signal.SIGTERM, None)]
    return 1 if failed else 0


# --- client commands: talk to a running service over HTTP (app.client), never to the database ----------

DEFAULT_URL = "http://127.0.0.1:8000"


class UsageError(Exception):
    """A mistake on the command line found after parsing (missing key, unreadable file): exit 2."""


def parse_param(text: str) -> tuple[str, Any]:
    """`k=v` -> (k, v): v as JSON when it parses (numbers, booleans, lists), else the string itself."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. --param per_channel=false)")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 1,8)") from None
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes are positive integers (e.g. 1,8)")
    return sizes


def parse_input_shape(text: str) -> tuple[str, list[int | None]]:
    """`x=1,3,48,320` -> ("x", [1, 3, 48, 320]); `?` (or N, or an empty place) leaves that axis to the server: the
    batch axis follows --batch-sizes."""
    name, sep, sizes = text.partition("=")
    if not sep or not name.strip() or not sizes.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not INPUT=SIZES (e.g. --input-shape x=1,3,48,320)")
    dims: list[int | None] = []
    for part in sizes.split(","):
        part = part.strip()
        if part in ("", "?", "N", "n"):
            dims.append(None)
            continue
        try:
            dims.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: each size is a whole number, or ? for the batch axis "
                                             "(e.g. x=?,3,48,320)") from None
    return name.strip(), dims


def parse_dim(text: str) -> tuple[str, int]:
    """`H=48` -> ("H", 48): a symbolic dim of the model by name."""
    name, sep, size = text.partition("=")
    try:
        if not sep or not name.strip():
            raise ValueError
        return name.strip(), int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=SIZE (e.g. --dim H=48)") from None


def parse_value(text: str) -> tuple[str, Any]:
    """`sr=16000` -> ("sr", 16000); the value is JSON (`flag=true`, `mask=[[1,0]]`)."""
    name, sep, raw = text.partition("=")
    try:
        if not sep or not name.strip():
            raise ValueError
        return name.strip(), json.loads(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE with a JSON value (e.g. --input-value "
                                         "sr=16000)") from None


def parse_target(text: str) -> dict[str, str]:
    """`openvino:cpu:bf16` -> {"runtime": "openvino", "device": "cpu", "precision": "bf16"} (the precision may be left
    out: the target's default). The server checks the values and that a worker serves the target."""
    parts = [part.strip().lower() for part in text.split(":")]
    if len(parts) not in (2, 3) or not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not RUNTIME:DEVICE[:PRECISION] (e.g. --target openvino:cpu:bf16; "
                                         "modelpress targets lists what the workers serve)")
    return dict(zip(("runtime", "device", "precision"), parts))


def input_shapes_spec(shapes: list[tuple[str, list[int | None]]] | None,
                      dims: list[tuple[str, int]] | None) -> dict[str, Any] | None:
    """evaluate.input_shapes from --input-shape and --dim (the server checks them against the model)."""
    spec: dict[str, Any] = dict(shapes or [])
    if dims:
        spec["dims"] = dict(dims)
    return spec or None


def _client(args: argparse.Namespace):
    from app.client import Client

    url = args.url or os.environ.get("MODELPRESS_URL") or DEFAULT_URL
    key = args.key or os.environ.get("MODELPRESS_API_KEY")
    if not key:
        raise UsageError("no API key: pass --key or set MODELPRESS_API_KEY (`modelpress run` prints the local one)")
    return Client(url, key)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _fmt_bytes(size: float | None) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size} B"  # pragma: no cover


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """The job summary as (what, value) rows a person reads: the verdict and why, size, speed per batch size,
    accuracy, notes."""
    rows: list[tuple[str, str]] = []
    if summary.get("verdict"):
        rows.append(("verdict", f"{verdict_word(summary)}: {summary['verdict']['reason']}"))
    if summary.get("size_ratio") is not None:
        rows.append(("size", f"{_fmt_bytes(summary.get('original_size_bytes'))} -> "
                             f"{_fmt_bytes(summary.get('compressed_size_bytes'))} (x{summary['size_ratio']:.2f})"))
    noisy = set(summary.get("noisy_batch_sizes") or [])
    p50 = summary.get("latency_p50_ms") or {}
    for batch, speedup in (summary.get("speedup") or {}).items():
        shown = (summary.get("speedup_ci") or {}).get(batch) or (f"{speedup:.2f}x" if speedup is not None else "?")
        latency = p50.get(batch) or {}
        if latency.get("original") is not None and latency.get("compressed") is not None:
            shown += f"   p50 {latency['original']:.3f} -> {latency['compressed']:.3f} ms"
        if int(batch) in noisy:
            shown += "   (noisy: CV over 10%)"
        rows.append((f"speedup, batch {batch}", shown))
    if summary.get("provider"):
        rows.append(("provider", str(summary["provider"])))
    rows += target_rows(summary)
    accuracy = summary.get("accuracy")
    if accuracy:
        change = -accuracy["top1_drop_points"]
        rows.append(("accuracy (top-1)", f"{100 * accuracy['original_top1']:.2f}% -> "
                                         f"{100 * accuracy['compressed_top1']:.2f}% "
                                         f"({change:+.2f} points, {accuracy['samples']} samples)"))
    fidelity = summary.get("fidelity") or {}
    parts = []
    if fidelity.get("cosine_similarity") is not None:
        parts.append(f"cosine {fidelity['cosine_similarity']:.4f}")
    if fidelity.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {100 * fidelity['top1_agreement']:.1f}%")
    if fidelity.get("max_abs_diff") is not None:
        parts.append(f"max abs diff {fidelity['max_abs_diff']:.3g}")
    if parts:
        where = f" (on {summary['fidelity_on']})" if summary.get("fidelity_on") else ""
        rows.append(("fidelity", ", ".join(parts) + where))
    if summary.get("energy_j_per_inference") is not None:
        energy = summary["energy_j_per_inference"]  # {"original": J, "compressed": J, ...} per inference
        rows.append(("energy", ", ".join(f"{k} {v:.4g} J" for k, v in energy.items() if isinstance(v, (int, float)))
                     + " per inference" if isinstance(energy, dict) else f"{energy:.4g} J per inference"))
    elif summary.get("energy_note"):
        rows.append(("energy", f"not measured: {summary['energy_note']}"))
    sources = summary.get("input_shapes_source") or {}
    for name, shape in (summary.get("input_shapes") or {}).items():
        chosen = sorted({s for s in sources.get(name, []) if s not in ("batch size", "declared by the model")})
        rows.append((f"input {name}", "[" + ", ".join(map(str, shape)) + "]"
                     + (f" ({'; '.join(chosen)})" if chosen else "")))
    for skipped in summary.get("skipped_batch_sizes") or []:
        rows.append((f"skipped, batch {skipped.get('batch_size')}", str(skipped.get("reason", ""))))
    for note in summary.get("notes") or []:
        rows.append(("note", str(note)))
    return rows


def verdict_word(summary: dict) -> str:
    """"beneficial" / "not beneficial", or "" for a summary written before verdicts."""
    return ((summary.get("verdict") or {}).get("verdict") or "").replace("_", " ")


def pareto_table(report: dict):
    """The report's Pareto front as a table (None when the report has none): each model's p50, size, worst-sample
    cosine and energy, and whether it is on the front or which models beat it."""
    points = report.get("pareto")
    if not points:
        return None
    from rich.table import Table
    from rich.text import Text

    batch = ((report.get("summary") or {}).get("verdict") or {}).get("budget", {}).get("batch_size")
    energy = all(p.get("energy_j") is not None for p in points)
    table = Table(title="Pareto front: a model is on it when no other is as good on every count and better on one",
                  title_justify="left")
    for column in ("model", f"p50 ms{f' @{batch}' if batch else ''}", "size", "worst cosine") + (
            ("energy J",) if energy else ()) + ("front",):
        table.add_column(column, overflow="fold")
    for point in points:
        front = "on the front" if point["on_front"] else "dominated by " + ", ".join(point["dominated_by"])
        cells = [point["name"], "?" if point.get("p50_ms") is None else f"{point['p50_ms']:.4g}",
                 _fmt_bytes(point.get("size_bytes")),
                 "?" if point.get("worst_cosine") is None else f"{point['worst_cosine']:.4f}"]
        table.add_row(*map(Text, cells + ([f"{point['energy_j']:.4g}"] if energy else []) + [front]))
    return table


def _print_report_tables(mp, job: dict, report: dict | None = None) -> None:
    """A succeeded job's candidates (a goal job's) and Pareto front, read from its report; nothing for a report
    without them."""
    from app.client import ModelPressError

    try:
        report = report if report is not None else mp.report(job["id"])
    except ModelPressError as exc:  # the summary is printed already; the tables are extras
        _stderr(f"no candidates or Pareto front: {exc}")
        return
    for table in (candidates_table(report), pareto_table(report)):
        if table is not None:
            _console().print(table)


def goal_text(goal: dict) -> str:
    """A goal in a line: `latency at batch 1; worst cosine >= 0.99; time budget 900 s; families: all that apply`."""
    parts = [f"{goal.get('objective', 'latency')} at batch {goal.get('batch_size', 1)}"]
    bounds = {"min_cosine": "worst cosine >= {}", "max_accuracy_drop": "top-1 drop <= {} points",
              "max_latency_ms": "p50 <= {} ms", "max_size_bytes": "size <= {}", "min_speedup": "at least {}x faster"}
    for field, text in bounds.items():
        if goal.get(field) is not None:
            parts.append(text.format(_fmt_bytes(goal[field]) if field == "max_size_bytes" else goal[field]))
    parts.append(f"time budget {goal.get('time_budget_s', '?')} s")
    parts.append("families: " + (", ".join(goal["families"]) if goal.get("families") else "all that apply"))
    datasets = {k.removesuffix("_dataset_id"): v for k, v in (goal.get("datasets") or {}).items() if v}
    if datasets:
        parts.append("datasets: " + ", ".join(f"{role} {value}" for role, value in datasets.items()))
    return "; ".join(parts)


def goal_rows(report: dict) -> list[tuple[str, str]]:
    """A goal job's lead: the verdict and why, what was handed over (or what came closest), the search's counts and
    time, the goal; and whose figures the summary rows after them are."""
    search = report.get("search") or {}
    summary = report.get("summary") or {}
    rows: list[tuple[str, str]] = []
    if summary.get("verdict"):
        rows.append(("verdict", f"{verdict_word(summary)}: {summary['verdict']['reason']}"))
    by_name = {c["name"]: c for c in report.get("candidates") or []}
    if search.get("result_artifact"):
        rows.append(("result", f"{search['result_artifact']}: candidate {search['chosen']}"))
        rows.append(("figures below", f"{search['chosen']}, measured again with the job's evaluate settings"))
    else:
        closest = search.get("closest") or search.get("best_in_search")
        artifact = (by_name.get(closest) or {}).get("artifact") if closest else None
        rows.append(("result", "nothing handed over: no candidate met the goal" + (
            f"; the closest was {closest}" + (f" ({artifact})" if artifact else "") if closest else "")))
        if closest:
            rows.append(("figures below", f"{closest}'s measurement in the search"))
    counts = search.get("candidates") or {}
    if counts:
        total = sum(counts.values())
        rows.append(("search", f"{total} candidate{'s' if total != 1 else ''} ("
                     + ", ".join(f"{n} {status}" for status, n in counts.items()) + f") in {search.get('elapsed_s', '?')} s "
                     f"of the {search.get('time_budget_s', '?')} s budget"))
    if search.get("goal"):
        rows.append(("goal", goal_text(search["goal"])))
    return rows


def candidates_table(report: dict):
    """A goal job's candidates, one row each: family, status, speedup with its interval at the goal's batch size,
    worst-sample cosine, size ratio, and its verdict (or why it failed or was skipped). None without candidates."""
    candidates = report.get("candidates")
    if not candidates:
        return None
    from rich.table import Table
    from rich.text import Text

    search = report.get("search") or {}
    batch = str((search.get("goal") or {}).get("batch_size")
                or ((report.get("summary") or {}).get("verdict") or {}).get("budget", {}).get("batch_size") or 1)
    table = Table(title="candidates (each downloadable: modelpress download JOB --name ARTIFACT)", title_justify="left")
    for column in ("candidate", "family", "status", f"speedup @{batch}", "worst cosine", "size", "verdict", "artifact"):
        # The figures stay on one line; the names, the verdict's reason and the artifact fold.
        table.add_column(column, overflow="fold", no_wrap=column in ("status", f"speedup @{batch}", "worst cosine", "size"))
    for candidate in candidates:
        name = candidate["name"]
        if name == search.get("chosen"):
            name += " (chosen)"
        elif name == search.get("closest"):
            name += " (closest)"
        summary = candidate.get("summary") or {}
        speedup = (summary.get("speedup_ci") or {}).get(batch) or (
            f"{summary['speedup'][batch]:.2f}x" if (summary.get("speedup") or {}).get(batch) is not None else "-")
        fidelity = summary.get("fidelity") or {}
        cosine = fidelity.get("worst_cosine", fidelity.get("cosine_similarity"))
        ratio = summary.get("size_ratio")
        if candidate.get("verdict"):
            judged = f"{verdict_word(candidate)}: {candidate['verdict']['reason']}"
        elif candidate.get("error"):
            judged = f"{candidate['error']['code']}: {candidate['error']['message']}"
        else:
            judged = "-"
        table.add_row(*map(Text, (name, candidate.get("family") or "-", candidate["status"], speedup,
                                  "-" if cosine is None else f"{cosine:.4f}", "-" if ratio is None else f"x{ratio:.2f}",
                                  judged, candidate.get("artifact") or "-")))
    return table


def target_rows(summary: dict) -> list[tuple[str, str]]:
    """A job with a target: where it ran, and its speedup split into the runtime's gain (the original on the target
    vs ONNX Runtime fp32) and the compression's (the result vs the original, both on the target); the speedup rows
    above are their product."""
    target = summary.get("target")
    if not target:
        return []
    name = "/".join(str(target[k]) for k in ("runtime", "device", "precision") if target.get(k))
    rows = [("target", name + (f" on {target['device_name']}" if target.get("device_name") else ""))]
    for label, key in (("runtime gain", "runtime_speedup"), ("compression gain", "compression_speedup")):
        texts = summary.get(f"{key}_ci") or {}
        for batch, value in (summary.get(key) or {}).items():
            rows.append((f"{label}, batch {batch}", texts.get(batch) or (f"{value:.2f}x" if value is not None else "?")))
    return rows


def _table(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for what, value in rows:
        table.add_row(Text(what), Text(value))  # Text: no rich markup from server strings
    return table


def _console():
    from rich.console import Console

    return Console(soft_wrap=False)


def _job_rows(job: dict) -> list[tuple[str, str]]:
    steps = ", ".join(s.get("method", "?") for s in job.get("steps") or []) or (
        "chosen by the search" if job.get("goal") else "")
    recipe = (job.get("recipe") or {}).get("id")
    rows = [("id", job["id"]), ("status", job["status"]), ("progress", f"{100 * job['progress']:.0f}%"),
            ("steps", f"{steps} (recipe {recipe})" if recipe else steps), ("model", str(job.get("model_id")))]
    if job.get("goal"):
        rows.insert(3, ("goal", goal_text(job["goal"])))
    if job.get("target"):
        rows.append(("target", "/".join(str(job["target"][k]) for k in ("runtime", "device", "precision")
                                        if job["target"].get(k))))
    for field in ("name", "stage", "message", "created_at", "started_at", "finished_at"):
        if job.get(field):
            rows.append((field.replace("_", " "), str(job[field])))
    if job.get("error"):
        rows.append(("error", f"{job['error']['code']}: {job['error']['message']}"))
    return rows


def _wait_with_progress(mp, job: dict) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
    from rich.table import Column

    console = Console(stderr=True)
    room = max(10, console.width - 58)  # what the status, bar, percentage and clock leave for the message
    columns = (TextColumn("[bold]{task.fields[status]}", table_column=Column(min_width=9, no_wrap=True)),
               BarColumn(bar_width=30), TaskProgressColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[message]}", markup=False))
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job["id"], total=1.0, completed=job["progress"], status=job["status"], message="")

        def show(current: dict) -> None:
            message = current.get("message") or current.get("stage") or ""
            bar.update(task, completed=current["progress"], status=current["status"], message=_cut(message, room))

        return mp.wait(job["id"], on_progress=show, poll_s=0.5)


def _follow(mp, job: dict, args: argparse.Namespace) -> dict | int:
    """A job just queued: without --wait or -o, print its id (or its JSON) and answer 0; else wait with progress and
    answer the finished job (130 when Ctrl-C stops the waiting: the job goes on)."""
    if not (args.wait or args.output):
        if args.json:
            _print_json(job)
        else:
            print(job["id"])
        return 0
    try:
        return _wait_with_progress(mp, job)
    except KeyboardInterrupt:
        _stderr(f"stopped waiting; job {job['id']} goes on (modelpress jobs show {job['id']}; "
                f"modelpress jobs cancel {job['id']})")
        return 130


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _finished(job: dict, *, as_json: bool) -> int:
    """Print a terminal job; 0 when it succeeded, 1 when it failed or was cancelled."""
    if as_json:
        _print_json(job)
    elif job["status"] == "succeeded" and job.get("summary"):
        word = verdict_word(job["summary"])
        _console().print(_table(f"job {job['id']}: succeeded" + (f", {word}" if word else ""),
                                summary_rows(job["summary"])))
    if job["status"] == "succeeded":
        return 0
    error = job.get("error") or {"code": job["status"], "message": job.get("message") or ""}
    _stderr(f"job {job['id']} {job['status']}: {error['code']}: {error['message']}")
    return 1


def cmd_compress(args: argparse.Namespace) -> int:
    model_path = Path(args.model)
    if not model_path.is_file() or not os.access(model_path, os.R_OK):
        raise UsageError(f"cannot read {model_path}: no such readable file")
    params = dict(args.param or [])
    evaluate: dict[str, Any] = {}
    if args.batch_sizes:
        evaluate["batch_sizes"] = args.batch_sizes
    if args.warmup is not None:
        evaluate["warmup"] = args.warmup
    if args.iterations is not None:
        evaluate["iterations"] = args.iterations
    if input_shapes := input_shapes_spec(args.input_shape, args.dim):
        evaluate["input_shapes"] = input_shapes
    if args.input_value:
        evaluate["input_values"] = dict(args.input_value)
    target = dict(args.target) if args.target else None
    if args.calibration_dataset:
        if target is None:
            raise UsageError("--calibration-dataset goes with --target RUNTIME:DEVICE:int8")
        target["calibration_dataset_id"] = args.calibration_dataset
    if not (args.method or args.recipe) and (target is None or (target["runtime"], target["device"]) == ("onnxruntime", "cpu")):
        raise UsageError("give --method or --recipe (only a --target other than onnxruntime:cpu may go without: its "
                         "lowering is the compression)")
    with _client(args) as mp:
        model = mp.upload_model(model_path)
        if args.recipe:
            job = mp.submit_job(model["id"], recipe=args.recipe, params=params, evaluate=evaluate or None,
                                name=args.name, target=target)
        else:
            steps = [{"method": args.method, "params": params}] if args.method else None
            job = mp.submit_job(model["id"], steps=steps, evaluate=evaluate or None, name=args.name, target=target)
        _stderr(f"uploaded {model_path.name} as model {model['id']}; job {job['id']} queued")
        followed = _follow(mp, job, args)
        if isinstance(followed, int):
            return followed
        job = followed
        code = _finished(job, as_json=args.json)
        if code == 0 and not args.json:
            _print_report_tables(mp, job)
        if code == 0 and args.output:
            saved = mp.download(job["id"], "model.onnx", dest=args.output)
            _stderr(f"saved the compressed model to {saved} ({_fmt_bytes(saved.stat().st_size)}, sha256 checked)")
        return code


def dataset_id(mp, value: str | None, role: str) -> str | None:
    """--eval-dataset and the like: a readable file is uploaded (its id is used), anything else is a dataset id."""
    if value is None:
        return None
    return _uploaded_or_id(value, upload=mp.upload_dataset, what=f"the {role} dataset", noun="dataset",
                           suffixes=(".npz", ".safetensors"))


def _uploaded_or_id(value: str, *, upload, what: str, noun: str, suffixes: tuple[str, ...]) -> str:
    """A readable file is uploaded (its new id is answered); a value that looks like a path but is not readable is
    a usage error; anything else is taken as an id."""
    path = Path(value)
    if path.is_file():
        uploaded = upload(path)
        _stderr(f"uploaded {path.name} as {what} {uploaded['id']}")
        return str(uploaded["id"])
    if path.suffix in suffixes or os.sep in value:
        raise UsageError(f"cannot read {value}: no such readable file (or give a {noun} id)")
    return value


def goal_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The goal from optimize's flags: only what was given (the server fills the defaults and checks the rest)."""
    goal: dict[str, Any] = {}
    for flag, field in (("objective", "objective"), ("batch_size", "batch_size"), ("min_cosine", "min_cosine"),
                        ("max_accuracy_drop", "max_accuracy_drop"), ("max_latency_ms", "max_latency_ms"),
                        ("max_size_bytes", "max_size_bytes"), ("min_speedup", "min_speedup"),
                        ("time_budget", "time_budget_s"),
                        ("families", "families")):
        if getattr(args, flag) is not None:
            goal[field] = getattr(args, flag)
    if args.no_min_cosine:
        goal["min_cosine"] = None  # judged by --max-accuracy-drop alone (the server refuses a goal with neither)
    return goal


def cmd_optimize(args: argparse.Namespace) -> int:
    model_path = Path(args.model)
    if not model_path.is_file() or not os.access(model_path, os.R_OK):
        raise UsageError(f"cannot read {model_path}: no such readable file")
    goal = goal_spec(args)
    with _client(args) as mp:
        datasets = {f"{role}_dataset_id": dataset_id(mp, getattr(args, f"{role}_dataset"), role)
                    for role in ("eval", "calibration", "train")}
        if any(datasets.values()):
            goal["datasets"] = {k: v for k, v in datasets.items() if v}
        model = mp.upload_model(model_path)
        job = mp.optimize(model["id"], name=args.name, **goal)
        _stderr(f"uploaded {model_path.name} as model {model['id']}; job {job['id']} queued: "
                f"{goal_text(job.get('goal') or {})}")
        followed = _follow(mp, job, args)
        if isinstance(followed, int):
            return followed
        job = followed
        if job["status"] != "succeeded" or args.json:
            code = _finished(job, as_json=args.json)
            if code:
                return code
        report = mp.report(job["id"])
        if not args.json:
            word = verdict_word(job.get("summary") or {})
            summary = [row for row in summary_rows(job.get("summary") or {}) if row[0] != "verdict"]
            _console().print(_table(f"job {job['id']}: succeeded" + (f", {word}" if word else ""),
                                    goal_rows(report) + summary))
            _print_report_tables(mp, job, report)
        search = report.get("search") or {}
        if args.output and search.get("result_artifact"):
            name = search["result_artifact"]
            if args.output.endswith(("/", os.sep)):  # a folder, made if need be: the artifact's own name goes in it
                Path(args.output).mkdir(parents=True, exist_ok=True)
            saved = mp.download(job["id"], name, dest=args.output)
            _stderr(f"saved the chosen model ({search['chosen']}, {name}) to {saved} "
                    f"({_fmt_bytes(saved.stat().st_size)}, sha256 checked)")
        elif args.output:
            closest = search.get("closest")
            artifact = next((c.get("artifact") for c in report.get("candidates") or [] if c["name"] == closest), None)
            _stderr(f"nothing saved to {args.output}: no candidate met the goal, so no model was handed over"
                    + (f"; the closest was {closest}" if closest else "")
                    + (f" (modelpress download {job['id']} --name {artifact} -o ...)" if artifact else ""))
        return 0


def _model_id(mp, value: str, role: str) -> str:
    """A readable .onnx/.zip file is uploaded (its id is used); anything else is taken as a model id."""
    return _uploaded_or_id(value, upload=mp.upload_model, what=f"the {role} model", noun="model",
                           suffixes=(".onnx", ".zip"))


def _baseline_ref(mp, value: str) -> dict[str, str]:
    """--baseline: model:ID, job:ID, a file (uploaded), or a bare id, tried as a model and then as a job."""
    from app.client import NotFound

    kind, _, rest = value.partition(":")
    if kind in ("model", "job") and rest:
        return {f"{kind}_id": rest}
    if Path(value).is_file() or Path(value).suffix in (".onnx", ".zip"):
        return {"model_id": _model_id(mp, value, "baseline")}
    try:
        mp.model(value)
    except NotFound:
        return {"job_id": value}
    return {"model_id": value}


def gate_rows(gate: dict) -> list[tuple[str, str]]:
    """A finished gate: the verdict, then each check with its evidence."""
    rows = [("verdict", f"{(gate.get('verdict') or '?').upper()}: {gate.get('reason') or ''}")]
    for check in gate.get("checks") or []:
        rows.append((check["name"], f"{'pass' if check['passed'] else 'FAIL'} (value {check.get('value')}, limit "
                                    f"{check.get('limit')})"))
    return rows


def cmd_gate(args: argparse.Namespace) -> int:
    """Exit status: 0 the gate passed (or, without --wait, was queued), 1 it failed, 2 an error: a usage error, a
    refused request, a gate job that failed or was cancelled."""
    from app.client import ModelPressError

    policy = {"max_slowdown_pct": args.max_slowdown, "min_cosine": args.min_cosine,
              "max_accuracy_drop": args.max_accuracy_drop, "max_size_bytes": args.max_size_bytes,
              "max_size_growth_pct": args.max_size_growth}
    if all(value is None for value in policy.values()):
        raise UsageError("give at least one limit: --max-slowdown, --min-cosine, --max-accuracy-drop, "
                         "--max-size-bytes or --max-size-growth")
    try:
        with _client(args) as mp:
            candidate = _model_id(mp, args.candidate, "candidate")
            baseline = _baseline_ref(mp, args.baseline)
            eval_dataset = dataset_id(mp, args.eval_dataset, "eval")
            gate = mp.gate(candidate, baseline_model_id=baseline.get("model_id"),
                           baseline_job_id=baseline.get("job_id"), eval_dataset_id=eval_dataset,
                           batch_size=args.batch_size, time_budget_s=args.time_budget, name=args.name, **policy)
            _stderr(f"gate {gate['id']} queued: candidate {candidate} against "
                    + ", ".join(f"{k.removesuffix('_id')} {v}" for k, v in gate["baseline"].items()))
            followed = _follow(mp, gate, args)
            if isinstance(followed, int):
                return 0 if followed == 0 else 2
            if followed["status"] != "succeeded":
                error = followed.get("error") or {"code": followed["status"], "message": followed.get("message") or ""}
                _stderr(f"gate {gate['id']} {followed['status']}: {error['code']}: {error['message']}")
                return 2
            result = mp.gate_result(gate["id"])
    except ModelPressError as exc:
        _stderr(f"error: {exc.code}: {exc.message}")
        return 2
    if args.json:
        _print_json(result)
    else:
        _console().print(_table(f"gate {result['id']}: {(result['verdict'] or '?').upper()}", gate_rows(result)))
        for check in result.get("checks") or []:
            if not check["passed"]:
                _stderr(f"failed: {check['name']}")
    return 0 if result["verdict"] == "pass" else 1


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        jobs = mp.jobs(status=args.status, limit=args.limit)
    if args.json:
        _print_json(jobs)
        return 0
    from rich.table import Table
    from rich.text import Text

    console = _console()
    # The id is shown whole (the other commands take it); narrower terminals drop the later columns.
    with_created, with_message = console.width >= 110, console.width >= 140
    table = Table()
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("status", no_wrap=True, min_width=9)
    table.add_column("done", justify="right", no_wrap=True)
    table.add_column("steps")
    if with_created:
        table.add_column("created (UTC)", no_wrap=True)
    if with_message:
        table.add_column("message", no_wrap=True)
    for job in jobs:
        steps = ", ".join(s.get("method", "?") for s in job.get("steps") or []) or (
            f"goal: {job['goal'].get('objective', 'latency')}" if job.get("goal") else "")
        row = [job["id"], job["status"], f"{100 * job['progress']:.0f}%", Text(steps)]
        if with_created:
            row.append(str(job["created_at"])[:16].replace("T", " "))
        if with_message:
            row.append(Text(_cut(job.get("message") or "", console.width - 125)))
        table.add_row(*row)
    console.print(table)
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        job = mp.job(args.job_id)
        if args.json:
            _print_json(job)
            return 0
        console = _console()
        console.print(_table(f"job {job['id']}", _job_rows(job)))
        if job.get("summary"):
            console.print(_table("summary", summary_rows(job["summary"])))
        if job["status"] == "succeeded":
            _print_report_tables(mp, job)
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        job = mp.cancel(args.job_id)
    print(f"job {job['id']}: {job['status']}: {job.get('message') or ''}")
    return 0


def replay_rows(section: dict) -> list[tuple[str, str]]:
    """A replay's comparison (report.replay) as rows: the artifacts, what differed, and the figures that moved."""
    rows = [("replay of", str(section.get("original_job_id"))),
            ("byte-identical", "yes" if section.get("byte_identical") else "no")]
    for name, entry in (section.get("artifacts") or {}).items():
        rows.append((f"  {name}", "identical" if entry["identical"] else
                     f"differs ({(entry['original'] or '-')[:12]} -> {(entry['replay'] or '-')[:12]})"))
    if section.get("why_not_identical"):
        rows.append(("why", section["why_not_identical"]))
    for kind, entries in (section.get("differed") or {}).items():
        if kind in ("libraries", "environment"):
            rows += [(f"{kind[:-1] if kind == 'libraries' else kind} {name}",
                      f"{entry['original']} -> {entry['replay']}") for name, entry in entries.items()]
        else:
            rows.append((f"differed: {kind}", f"{entries.get('original')} -> {entries.get('replay')}"))
    for name, entry in (section.get("figures") or {}).items():
        if entry.get("change"):
            rows.append((name, f"{entry['original']} -> {entry['replay']} ({entry['change']:+.4g})"))
    return rows


def cmd_replay(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        job = mp.replay(args.job_id)
        _stderr(f"job {job['id']} queued: a replay of job {args.job_id}")
        followed = _follow(mp, job, args)
        if isinstance(followed, int):
            return followed
        job = followed
        code = _finished(job, as_json=args.json)
        if code == 0 and not args.json:
            section = mp.report(job["id"]).get("replay") or {}
            _console().print(_table(f"job {job['id']} against job {args.job_id}", replay_rows(section)))
        return code


def cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        saved = mp.download(args.job_id, args.name, dest=args.output)
    print(f"saved {args.name} to {saved} ({_fmt_bytes(saved.stat().st_size)}, sha256 checked)")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        methods = mp.methods()
    if args.json:
        _print_json(methods)
        return 0
    from rich.table import Table
    from rich.text import Text

    table = Table("method", "params", "what it does")
    for method in methods:
        params = ", ".join((method.get("params_schema") or {}).get("properties", {}))
        description = (method.get("description") or "").strip().split(". ")[0].rstrip(".") + "."
        table.add_row(method["id"], Text(params), Text(description))
    _console().print(table)
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        found = mp.targets()
    if args.json:
        _print_json(found)
    else:
        _console().print(targets_table(found["targets"]))
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    """Serve the MCP tools on stdio (app.mcp_server); refuses to start without a key (exit 2)."""
    client = _client(args)
    from app.mcp_server import serve

    return serve(client)


def targets_table(targets: list[dict]):
    """GET /v1/targets' targets as a table: name, queue, live workers, their devices, runtime versions."""
    from rich.table import Table
    from rich.text import Text

    table = Table("target", "queue", "workers", "devices", "versions", title="targets the live workers serve",
                  title_justify="left")
    for t in targets:
        name = "/".join(str(t[k]) for k in ("runtime", "device", "precision") if t.get(k))
        devices = "; ".join(d["name"] + (f" ({', '.join(d['isa'])})" if d.get("isa") else "")
                            + (f" ({_fmt_bytes(d['memory_bytes'])})" if d.get("memory_bytes") else "")
                            for d in t.get("devices") or [])
        versions = ", ".join(f"{k} {v}" for k, v in (t.get("versions") or {}).items())
        workers = str(t["workers"]) + (" (jobs wait for one)" if t.get("default") and not t["workers"] else "")
        table.add_row(Text(name + (" (default)" if t.get("default") else "")), Text(t["queue"]), Text(workers),
                      Text(devices or "-"), Text(versions or "-"))
    return table


def _add_client_commands(sub) -> None:
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", help=f"the service (env MODELPRESS_URL; default {DEFAULT_URL})")
    server.add_argument("--key", help="API key (env MODELPRESS_API_KEY)")

    compress = sub.add_parser("compress", parents=[server], help="upload a model, compress it, wait, download",
                              description="Upload MODEL, submit one method (or a recipe) on it; with --wait show "
                              "its progress and the measured summary; with -o save the compressed model. "
                              "Exit status: 0 done, 1 job failed or cancelled (or a server error), 2 usage error.")
    compress.add_argument("model", help="an .onnx file (or a .zip of .onnx + external data)")
    what = compress.add_mutually_exclusive_group()
    what.add_argument("--method", help="a method id (modelpress methods), e.g. quantize.int8_dynamic")
    what.add_argument("--recipe", help="a recipe id, e.g. prune-finetune-int8")
    compress.add_argument("--param", action="append", type=parse_param, metavar="KEY=VALUE",
                          help="a param of the method or recipe; VALUE is JSON when it parses, else a string")
    compress.add_argument("--batch-sizes", type=parse_batch_sizes, metavar="1,8", help="batch sizes to measure")
    compress.add_argument("--warmup", type=int, help="warm-up calls before timing (server default 10)")
    compress.add_argument("--iterations", type=int, help="timed calls per batch size (server default 100)")
    compress.add_argument("--input-shape", action="append", type=parse_input_shape, metavar="INPUT=1,3,48,320",
                          help="sizes of a model input's axes to measure and calibrate at (repeatable; ? for the "
                          "batch axis, which follows --batch-sizes)")
    compress.add_argument("--dim", action="append", type=parse_dim, metavar="NAME=SIZE",
                          help="size of a symbolic dim of the model by name, e.g. H=48 (repeatable)")
    compress.add_argument("--input-value", action="append", type=parse_value, metavar="INPUT=VALUE",
                          help="a fixed value (JSON) for an input that is not data, e.g. sr=16000 (repeatable)")
    compress.add_argument("--target", type=parse_target, metavar="RUNTIME:DEVICE[:PRECISION]",
                          help="build and measure the result for this target, e.g. openvino:cpu, openvino:cpu:bf16, "
                          "openvino:cpu:int8 (modelpress targets lists them; default onnxruntime:cpu); without "
                          "--method or --recipe, the target's lowering is the whole compression")
    compress.add_argument("--calibration-dataset", metavar="DATASET_ID",
                          help="with --target ...:int8: the dataset NNCF calibrates on")
    compress.add_argument("--name", help="a name for the job")
    compress.add_argument("--wait", action="store_true", help="show progress until the job finishes")
    compress.add_argument("-o", "--output", metavar="OUT.onnx", help="save the compressed model here (implies --wait)")
    compress.add_argument("--json", action="store_true", help="print the job as JSON instead of tables")
    compress.set_defaults(func=cmd_compress, usage=compress)

    from app.jobs.schemas import FAMILIES

    optimize = sub.add_parser(
        "optimize", parents=[server], help="upload a model, state a goal: get the best model that meets it, or the "
        "evidence that none does", description="Upload MODEL and submit a goal: the search tries the allowed method "
        "families and every target the workers serve, measures each candidate against the original, and hands over "
        "the best one that meets the goal (none when none does: every candidate stays downloadable). With no goal "
        "flags: fastest at batch 1 within cosine 0.99. Exit status: 0 done (whatever the verdict), 1 job failed or "
        "cancelled (or a server error), 2 usage error.")
    optimize.add_argument("model", help="an .onnx file (or a .zip of .onnx + external data)")
    optimize.add_argument("--objective", choices=["latency", "size", "energy"],
                          help="what to improve (default latency; energy only where a counter is readable)")
    optimize.add_argument("--batch-size", type=int, metavar="N", help="the batch size latency is judged at (default 1)")
    cosine = optimize.add_mutually_exclusive_group()
    cosine.add_argument("--min-cosine", type=float, metavar="X",
                        help="the worst sample's output cosine must be at least this (default 0.99)")
    cosine.add_argument("--no-min-cosine", action="store_true",
                        help="no cosine budget: judged by --max-accuracy-drop alone")
    optimize.add_argument("--max-accuracy-drop", type=float, metavar="P",
                          help="top-1 may drop at most P points (needs a labelled --eval-dataset)")
    optimize.add_argument("--max-latency-ms", type=float, metavar="MS", help="p50 at the batch size at most this")
    optimize.add_argument("--max-size-bytes", type=int, metavar="B", help="the result's files at most this")
    optimize.add_argument("--min-speedup", type=float, metavar="X",
                          help="the least gain worth having: the speedup interval's lower bound must reach X "
                          "(default: any gain above 1.00)")
    optimize.add_argument("--time-budget", type=int, metavar="S",
                          help="the search starts no candidate once this is spent (default 900 s)")
    optimize.add_argument("--families", type=lambda text: [f.strip() for f in text.split(",") if f.strip()],
                          metavar=",".join(FAMILIES[:2]) + ",...",
                          help=f"the method families the search may use (default all that apply): {', '.join(FAMILIES)}")
    for role, what in (("eval", "every candidate is judged on (accuracy with labels, fidelity always)"),
                       ("calibration", "the int8 candidates calibrate on (default: the eval dataset)"),
                       ("train", "pruning with fine-tuning and distillation train on (without it they are skipped)")):
        optimize.add_argument(f"--{role}-dataset", metavar="FILE|ID",
                              help=f"the samples {what}: an .npz or .safetensors file (uploaded) or a dataset id")
    optimize.add_argument("--name", help="a name for the job")
    optimize.add_argument("--wait", action="store_true", help="show progress until the job finishes")
    optimize.add_argument("-o", "--output", metavar="OUT",
                          help="save the model handed over here (model.onnx, or model_openvino.zip for an OpenVINO "
                          "IR; implies --wait); nothing is saved when no candidate met the goal")
    optimize.add_argument("--json", action="store_true", help="print the job as JSON instead of tables")
    optimize.set_defaults(func=cmd_optimize, usage=optimize)

    gate = sub.add_parser(
        "gate", parents=[server], help="gate a candidate model against a baseline: exit 0 pass, 1 fail, 2 error",
        description="Measure CANDIDATE against a baseline on one worker (the latency ratio with its interval, the "
        "worst-sample cosine of their outputs, top-1 accuracy on a labelled --eval-dataset, size) and judge it by "
        "the limits given. Exit status with --wait: 0 pass, 1 fail, 2 error (usage, a refused request, the gate's "
        "job failed or was cancelled); without --wait, 0 once queued (its id is printed).")
    gate.add_argument("candidate", help="an .onnx file (uploaded) or a model id")
    gate.add_argument("--baseline", required=True, metavar="MODEL_OR_JOB",
                      help="a model id, a job id (the model.onnx it handed over), an .onnx file (uploaded); "
                      "model:ID or job:ID says which")
    gate.add_argument("--max-slowdown", type=float, metavar="PCT",
                      help="fail when the candidate is slower by more than PCT%% beyond the interval (e.g. 3)")
    gate.add_argument("--min-cosine", type=float, metavar="X", help="the worst sample's output cosine at least X")
    gate.add_argument("--max-accuracy-drop", type=float, metavar="P",
                      help="top-1 may drop at most P points (needs a labelled --eval-dataset)")
    gate.add_argument("--max-size-bytes", type=int, metavar="B", help="the candidate's files at most B bytes")
    gate.add_argument("--max-size-growth", type=float, metavar="PCT",
                      help="the candidate's files at most PCT%% larger than the baseline's")
    gate.add_argument("--eval-dataset", metavar="FILE|ID",
                      help="fidelity and accuracy on this dataset (.npz/.safetensors file, uploaded, or a dataset "
                      "id); without it, fidelity on synthetic random inputs")
    gate.add_argument("--batch-size", type=int, default=1, metavar="N", help="latency at this batch size (default 1)")
    gate.add_argument("--time-budget", type=float, default=60, metavar="S",
                      help="the latency rounds stop by then, earlier when the decision is clear (default 60)")
    gate.add_argument("--name", help="a name for the gate")
    gate.add_argument("--wait", action="store_true", help="show progress until the gate finishes; exit by its verdict")
    gate.add_argument("--json", action="store_true", help="print the gate as JSON instead of a table")
    gate.set_defaults(func=cmd_gate, usage=gate, output=None)

    jobs = sub.add_parser("jobs", help="list, show or cancel jobs").add_subparsers(dest="jobs_command", required=True)
    listing = jobs.add_parser("list", parents=[server], help="your jobs, newest first")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_jobs_list, usage=listing)
    show = jobs.add_parser("show", parents=[server], help="one job with its summary")
    show.add_argument("job_id")
    show.add_argument("--json", action="store_true", help="print the job as JSON")
    show.set_defaults(func=cmd_jobs_show, usage=show)
    cancel = jobs.add_parser("cancel", parents=[server], help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=cmd_jobs_cancel, usage=cancel)

    replay = sub.add_parser("replay", parents=[server], help="run a finished job again with its recorded recipe",
                            description="Queue a new job with JOB_ID's recipe (same model, datasets, steps or goal). "
                            "With --wait, show its progress, then what differed from the original and whether its "
                            "models are byte-identical. Exit status: 0 done, 1 job failed or cancelled (or a server "
                            "error, e.g. 409 replay_model_deleted), 2 usage error.")
    replay.add_argument("job_id")
    replay.add_argument("--wait", action="store_true", help="wait for the replay and show the comparison")
    replay.add_argument("--json", action="store_true", help="print the job as JSON")
    replay.set_defaults(func=cmd_replay, usage=replay, output=None)

    download = sub.add_parser("download", parents=[server], help="download a job's artifact (sha256 checked)")
    download.add_argument("job_id")
    download.add_argument("--name", default="model.onnx", help="artifact name (default model.onnx)")
    download.add_argument("-o", "--output", required=True, metavar="PATH", help="file (or folder) to save to")
    download.set_defaults(func=cmd_download, usage=download)

    methods = sub.add_parser("methods", parents=[server], help="the compression methods and their params")
    methods.add_argument("--json", action="store_true")
    methods.set_defaults(func=cmd_methods, usage=methods)

    targets = sub.add_parser("targets", parents=[server], help="what the deployment's workers serve (--target)")
    targets.add_argument("--json", action="store_true")
    targets.set_defaults(func=cmd_targets, usage=targets)

    mcp = sub.add_parser("mcp", parents=[server], help="serve ModelPress as MCP tools over stdio (for agents)",
                         description="An MCP server on stdin/stdout: upload models and datasets, start a job or a "
                         "goal, follow it, read its report, download its artifacts; tool errors carry the REST "
                         "API's code, message and status. Exit status 2 without an API key.")
    mcp.set_defaults(func=cmd_mcp, usage=mcp)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="embedded default: migrate, then start the API and one worker")
    run.add_argument("--host")
    run.add_argument("--port", type=int)
    run.set_defaults(func=cmd_run)

    api = sub.add_parser("api", help="start the API (uvicorn)")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.add_argument("--log-level", default="info")
    api.add_argument("--workers", type=int, default=1, help="API processes (uvicorn workers); about one per core")
    api.add_argument("--no-access-log", dest="access_log", action="store_false",
                     help="no line per request (GET /metrics has the request latencies)")
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="start a Celery worker")
    worker.add_argument("--queues", default="gpu,cpu",
                        help="comma-separated: gpu,cpu; the worker also consumes the queue of every target it serves "
                        "(MODELPRESS_WORKER_TARGETS)")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--loglevel", default="info")
    worker.add_argument("--beat", action="store_true",
                        help="also run Celery beat (recovery sweep, retention); exactly one process of a deployment may")
    worker.set_defaults(func=cmd_worker)

    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key for a tenant (created if new) and print it")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scopes", default="read,write,admin", help="comma-separated: read,write,admin (default all)")
    create.add_argument("--expires-in-days", type=float, help="the key stops working after this many days")
    create.set_defaults(func=cmd_keys_create)
    revoke = keys.add_parser("revoke", help="revoke a key by its id (or the key itself)")
    revoke.add_argument("key")
    revoke.set_defaults(func=cmd_keys_revoke)
    keys.add_parser("list", help="list keys (never the secrets)").set_defaults(func=cmd_keys_list)

    tenants = sub.add_parser("tenants", help="tenant limits").add_subparsers(dest="tenants_command", required=True)
    limits = tenants.add_parser("limits", help="show or set a tenant's limits (-1: back to the server default, "
                                "0: unlimited)")
    limits.add_argument("tenant")
    limits.add_argument("--max-concurrent-jobs", type=int, help="queued + running jobs at once")
    limits.add_argument("--max-stored-bytes", type=int, help="bytes of models and datasets")
    limits.add_argument("--requests-per-minute", type=int, help="per API key")
    limits.set_defaults(func=cmd_tenants_limits)

    _add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "usage"):
        return args.func(args)
    from app.client import ModelPressError

    try:
        return args.func(args)
    except UsageError as exc:
        args.usage.error(str(exc))  # exits 2, like argparse's own errors
    except ModelPressError as exc:
        _stderr(f"error: {exc.code}: {exc.message}")
        return 1
    return 1  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
