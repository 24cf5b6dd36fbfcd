"""The production deployment description: docker-compose validates it, and it has every part."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

import pytest

from tests.helpers import IN_CI, ROOT
from tests.stack import BIN, RedisServer, base_env, modelpress, processes, wait_until


def compose_config() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        if IN_CI:
            pytest.fail("docker-compose is not installed (scripts/services.sh installs it with apt)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    done = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_compose_file_validates_and_describes_the_deployment():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(compose_config())
    services = config["services"]
    # Services behind a compose profile start only when asked for (`--profile monitoring`).
    optional = {name: service["profiles"] for name, service in services.items() if service.get("profiles")}
    assert set(services) - set(optional) == {"postgres", "redis", "migrate", "api", "worker", "beat"}
    assert optional == {"flower": ["monitoring"]}
    assert services["beat"]["command"][:4] == ["celery", "-A", "workers.celery_app", "beat"]
    assert services["migrate"]["command"] == ["modelpress", "migrate"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["MODELPRESS_MODE"] == "production"
        assert env["MODELPRESS_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["MODELPRESS_BROKER_URL"].startswith("redis://")
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    worker = services["worker"]
    assert worker["command"][:5] == ["celery", "-A", "workers.celery_app", "worker", "-Q"]
    assert worker["command"][5] == "gpu,cpu"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]


def test_dockerfile_pins_torch_through_the_constraints_file():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "-c constraints.txt" in dockerfile
    assert "USER 10001" in dockerfile  # numeric: a runtime that refuses root can check it without /etc/passwd
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def seconds(duration: str) -> float:
    """A compose duration as docker-compose (`1m`) or `docker compose` (`1m0s`) prints it, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def health_command(service: dict) -> str:
    """The shell command of a service's CMD-SHELL health check, as the container's shell receives it."""
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL", test
    return test[1].replace("$$", "$")


def test_worker_and_beat_have_health_checks_of_their_own():
    """The image's HEALTHCHECK is the API's (:8000/healthz): worker and beat serve no HTTP, so each needs its own,
    cheap enough to run every 30 s or more."""
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load(compose_config())["services"]
    commands = {}
    for name in ("worker", "beat"):
        check = services[name]["healthcheck"]
        commands[name] = health_command(services[name])
        assert "8000" not in commands[name] and "healthz" not in commands[name], commands[name]
        assert "inspect ping" in commands[name]
        assert seconds(check["interval"]) >= 30 and seconds(check["timeout"]) > 10  # above ping's own --timeout 10
    assert "celery@$HOSTNAME" in commands["worker"] and "celerybeat@$HOSTNAME" in commands["beat"]
    assert "--enable-remote-control" in services["beat"]["command"]  # beat answers pings only with it
    # The one-shot migration job is not health-checked at all (compose 1 prints NONE, compose 2 disable: true).
    migrate_check = services["migrate"]["healthcheck"]
    assert migrate_check.get("test") == ["NONE"] or migrate_check.get("disable") is True
    # The worker runs the GPU image, the others the CPU one.
    assert services["worker"]["build"]["dockerfile"] == "Dockerfile.gpu"
    assert services["worker"]["image"] == "modelpress:gpu"
    assert {services[name]["image"] for name in ("migrate", "api", "beat")} == {"modelpress:latest"}
    assert "dockerfile" not in services["migrate"]["build"] or services["migrate"]["build"]["dockerfile"] == "Dockerfile"


@pytest.mark.integration
def test_health_checks_pass_for_a_live_worker_and_beat_and_fail_for_a_dead_one(tmp_path):
    """compose's worker and beat commands run against a Redis of the test's own; their health checks, run as the
    container's shell runs them, pass while each process lives and fail once it is gone (beat's whatever the
    worker does: each check asks its own node)."""
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load(compose_config())["services"]
    redis = RedisServer(tmp_path).start()
    try:
        env = base_env(tmp_path / "data", MODELPRESS_BROKER_URL=redis.url, HOSTNAME=socket.gethostname())
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the venv's celery, as the image's PATH has it
        modelpress("migrate", env=env)
        worker = [str(BIN / "celery"), *services["worker"]["command"][1:]]
        beat = [str(BIN / "celery"), *services["beat"]["command"][1:]]
        beat[beat.index("/data/celerybeat-schedule")] = str(tmp_path / "celerybeat-schedule")

        def healthy(name: str) -> bool:
            done = subprocess.run(["sh", "-c", health_command(services[name])], env=env, capture_output=True,
                                  text=True, timeout=60)
            return done.returncode == 0

        with processes(worker, beat, env=env, log_dir=tmp_path) as (worker_proc, beat_proc):
            wait_until(lambda: healthy("worker"), timeout=180, every=1)
            wait_until(lambda: healthy("beat"), timeout=60, every=1)
            beat_proc.terminate()
            beat_proc.wait(timeout=30)
            assert not healthy("beat")
            assert healthy("worker")
            worker_proc.terminate()
            worker_proc.wait(timeout=60)
            assert not healthy("worker")
    finally:
        redis.stop()
