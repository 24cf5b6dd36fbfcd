"""The production deployment description: docker-compose validates it, and it has every part."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import IN_CI, ROOT


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
    assert "USER modelpress" in dockerfile
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
