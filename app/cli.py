"""`modelpress`: run the embedded service, the API or a worker; migrate; manage API keys."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

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

    with session_scope() as db:
        key, plaintext = create_key(db=db, tenant_name=args.tenant)
        key_id = key.id
    print(f"tenant: {args.tenant}\nkey id: {key_id}\napi key: {plaintext}\n(the key is shown once; store it now)")
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
            print(f"{key.id}  {key.prefix}…  tenant={key.tenant.name}  {state}")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = get_settings()
    uvicorn.run("app.main:app", host=args.host or settings.api_host, port=args.port or settings.api_port,
                log_level=args.log_level)
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
    from app.store import get_store

    settings = get_settings()
    settings.data_path.mkdir(parents=True, exist_ok=True)
    upgrade()
    get_store().clean_tmp()
    key = local_api_key()
    host, port = args.host or settings.api_host, args.port or settings.api_port
    env = {**os.environ, "MODELPRESS_DATA_DIR": str(settings.data_path)}
    worker = subprocess.Popen(worker_argv("gpu,cpu", 1, "info"), env=env)
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
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="start a Celery worker")
    worker.add_argument("--queues", default="gpu,cpu", help="comma-separated: gpu,cpu")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=cmd_worker)

    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key for a tenant (created if new) and print it")
    create.add_argument("--tenant", required=True)
    create.set_defaults(func=cmd_keys_create)
    revoke = keys.add_parser("revoke", help="revoke a key by its id (or the key itself)")
    revoke.add_argument("key")
    revoke.set_defaults(func=cmd_keys_revoke)
    keys.add_parser("list", help="list keys (never the secrets)").set_defaults(func=cmd_keys_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
