"""Pull a model from the tenant's MLflow registry: resolve its URI over MLflow's REST API, read its MLmodel file,
accept the ONNX flavour only, and download the ONNX file (and any external-data files it names) through the
tracking server.

Plain HTTP (httpcore, through the egress guard of app.integrations.egress) rather than the mlflow client: the
client would follow whatever artifact location the server names with this process's own access, a `file:` path
on the API's disk or an `s3:` bucket with its credentials, where a tenant's server could point it at another
tenant's blobs. Here artifacts are read only through the server's artifact proxy (`mlflow-artifacts:`, which
`mlflow server` serves by default); any other location is refused (mlflow_artifacts_not_proxied). Downloads
stream to disk under the upload's size cap and the tenant's storage quota.
"""
from __future__ import annotations

import base64
import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpcore

from app.errors import (
    InvalidMlflowUri,
    InvalidModel,
    MlflowArtifactsNotProxied,
    MlflowError,
    MlflowModelNotFound,
    MlflowNotOnnx,
    MlflowUnauthorized,
    MlflowUnreachable,
    PayloadTooLarge,
)
from app.integrations.egress import GuardedBackend, split_uri
from app.integrations.service import MlflowConnection
from app.store import file_sha256

TIMEOUT_S = 30.0
MAX_JSON_BYTES = 4 << 20
MAX_MLMODEL_BYTES = 1 << 20
# MLflow's run ids are 32 hex digits; other stores use other ids, never with a slash.
MODELS_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[0-9]+)$")
MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[A-Za-z0-9_\-]+)$")
RUNS = re.compile(r"^runs:/(?P<run_id>[A-Za-z0-9_\-]{1,64})/(?P<path>[^?#]+)$")
LOGGED_MODEL = re.compile(r"^models:/(?P<model_id>m-[A-Za-z0-9]+)/?$")


@dataclass
class Pulled:
    """The model, spooled to disk as an upload would be: one .onnx, or a .zip of it and its external data."""

    path: Path
    filename: str
    sha256: str
    size_bytes: int
    name: str
    origin: dict[str, Any] = field(default_factory=dict)


class Server:
    """The tracking server's REST API, each connection through the egress guard, the credential on each request."""

    def __init__(self, connection: MlflowConnection, *, allow_private: bool) -> None:
        split_uri(connection.tracking_uri)
        self.base = connection.tracking_uri.rstrip("/")
        self.netloc = urlsplit(self.base).netloc
        self.headers = [(b"Host", self.netloc.encode()), (b"User-Agent", b"ModelPress-MLflow/1")]
        if connection.token is not None:
            self.headers.append((b"Authorization", b"Bearer " + connection.token.encode()))
        elif connection.username is not None and connection.password is not None:
            pair = f"{connection.username}:{connection.password}".encode()
            self.headers.append((b"Authorization", b"Basic " + base64.b64encode(pair)))
        self.pool = httpcore.ConnectionPool(network_backend=GuardedBackend(allow_private=allow_private), retries=0)

    def close(self) -> None:
        self.pool.close()

    def _stream(self, path: str, params: dict[str, str] | None = None):
        url = self.base + path + (("?" + urlencode(params)) if params else "")
        timeouts = {"connect": TIMEOUT_S, "read": TIMEOUT_S, "write": TIMEOUT_S, "pool": TIMEOUT_S}
        return self.pool.stream("GET", url, headers=self.headers, extensions={"timeout": timeouts})

    def get_json(self, path: str, params: dict[str, str], *, missing: Callable[[str], Exception]) -> dict:
        """The JSON answer of a GET; `missing(message)` is raised for a 404 (or RESOURCE_DOES_NOT_EXIST)."""
        with self._guard():
            with self._stream(path, params) as response:
                body = _read_capped(response, MAX_JSON_BYTES, what=f"the answer to {path}")
        if response.status != 200:
            self._raise(response.status, body, path, missing)
        try:
            return json.loads(body)
        except ValueError:
            raise MlflowError(f"the MLflow server's answer to {path} is not JSON (is {self.base} an MLflow "
                              "tracking server?)") from None

    def download(self, path: str, dest: Path, *, budget: Budget, missing: Callable[[str], Exception]) -> None:
        """Stream an artifact to `dest`, charging its bytes to `budget`."""
        with self._guard():
            with self._stream(path) as response:
                if response.status != 200:
                    self._raise(response.status, _read_capped(response, MAX_JSON_BYTES, what=path), path, missing)
                with open(dest, "wb") as out:
                    for chunk in response.iter_stream():
                        budget.spend(len(chunk))
                        out.write(chunk)

    def _guard(self):
        return _NetworkErrors(self.base)

    def _raise(self, status: int, body: bytes, path: str, missing: Callable[[str], Exception]):
        detail = _error_message(body)
        if status in (401, 403):
            raise MlflowUnauthorized(
                f"the MLflow server at {self.base} refused the tenant's credentials (HTTP {status}"
                + (f": {detail}" if detail else "") + "); set them with PUT /v1/integrations/mlflow")
        if status == 404 or '"RESOURCE_DOES_NOT_EXIST"' in body.decode(errors="replace"):
            raise missing(detail or f"HTTP {status}")
        raise MlflowError(f"the MLflow server at {self.base} answered HTTP {status} to {path}"
                          + (f": {detail}" if detail else ""), upstream_status=status)


class _NetworkErrors:
    """Connection failures as mlflow_unreachable, in words."""

    def __init__(self, base: str) -> None:
        self.base = base

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None:
            return False
        if isinstance(exc, httpcore.TimeoutException):
            raise MlflowUnreachable(f"the MLflow server at {self.base} did not answer within {TIMEOUT_S:g} s") from None
        if isinstance(exc, (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError)):
            raise MlflowUnreachable(f"the MLflow server at {self.base} is unreachable: {type(exc).__name__}: "
                                    f"{exc or 'connection failed'}") from None
        return False


@dataclass
class Budget:
    """Bytes the pulled files may still take: the upload cap, then the tenant's quota (as an upload's are)."""

    max_bytes: int
    quota_left: int | None = None
    quota_error: Callable[[int], Exception] | None = None
    spent: int = 0

    def spend(self, size: int) -> None:
        self.spent += size
        if self.spent > self.max_bytes:
            raise PayloadTooLarge(f"the MLflow model exceeds the {self.max_bytes} byte upload limit",
                                  limit_bytes=self.max_bytes)
        if self.quota_left is not None and self.quota_error is not None and self.spent > self.quota_left:
            raise self.quota_error(self.spent)


def _read_capped(response, limit: int, *, what: str) -> bytes:
    data = bytearray()
    for chunk in response.iter_stream():
        data += chunk
        if len(data) > limit:
            raise MlflowError(f"{what} is larger than {limit} bytes")
    return bytes(data)


def _error_message(body: bytes) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:300]
    if isinstance(parsed, dict):
        return str(parsed.get("message") or parsed.get("error_code") or "")[:300]
    return ""


# --- the URI, resolved to an artifact folder the server proxies ---------------------------------------

def parse(uri: str) -> dict[str, str]:
    """The parts of a model URI; InvalidMlflowUri for anything but the three forms."""
    for kind, pattern in (("version", MODELS_VERSION), ("alias", MODELS_ALIAS), ("run", RUNS)):
        match = pattern.match(uri)
        if match:
            parts = match.groupdict() | {"kind": kind}
            if kind == "run" and not _safe_relative(parts["path"]):
                break
            return parts
    raise InvalidMlflowUri(f"{uri[:200]!r} is not an MLflow model URI ModelPress pulls: give models:/<name>/<version>, "
                           "models:/<name>@<alias> or runs:/<run_id>/<path>", field="mlflow_uri")


def _safe_relative(path: str) -> bool:
    rel = PurePosixPath(path)
    return bool(rel.parts) and not rel.is_absolute() and ".." not in rel.parts and "\\" not in path and "\x00" not in path


def resolve(server: Server, uri: str) -> tuple[str, dict[str, Any], str]:
    """(the model folder's artifact location, where it came from, a default name for the stored model)."""
    parts = parse(uri)

    def missing(message: str) -> Exception:
        return MlflowModelNotFound(f"{uri}: the MLflow server has no such model ({message})", mlflow_uri=uri)

    origin: dict[str, Any] = {"uri": uri, "tracking_uri": server.base}
    if parts["kind"] == "run":
        run = server.get_json("/api/2.0/mlflow/runs/get", {"run_id": parts["run_id"]}, missing=missing)["run"]
        origin["run_id"] = parts["run_id"]
        folder = run["info"]["artifact_uri"].rstrip("/") + "/" + parts["path"].strip("/")
        logged = _logged_model_of_run(server, run, parts["path"].strip("/"), missing)
        name = f"{PurePosixPath(parts['path']).name}-{parts['run_id'][:8]}.onnx"
        return (logged or folder), origin, name
    name = parts["name"]
    if parts["kind"] == "alias":
        found = server.get_json("/api/2.0/mlflow/registered-models/alias", {"name": name, "alias": parts["alias"]},
                                missing=missing)
        version = str(found["model_version"]["version"])
    else:
        version = parts["version"]
        server.get_json("/api/2.0/mlflow/model-versions/get", {"name": name, "version": version}, missing=missing)
    location = server.get_json("/api/2.0/mlflow/model-versions/get-download-uri", {"name": name, "version": version},
                               missing=missing)["artifact_uri"]
    origin |= {"registered_model": name, "version": version}
    logged_model = LOGGED_MODEL.match(location)
    if logged_model:  # MLflow 3: a version of a logged model, whose artifacts live where the logged model says
        location = _logged_model_location(server, logged_model["model_id"], missing)
    return location, origin, f"{name}-v{version}.onnx"


def _logged_model_location(server: Server, model_id: str, missing) -> str:
    found = server.get_json(f"/api/2.0/mlflow/logged-models/{quote(model_id)}", {}, missing=missing)
    return found["model"]["info"]["artifact_uri"]


def _logged_model_of_run(server: Server, run: dict, path: str, missing) -> str | None:
    """MLflow 3 keeps a model logged in a run apart from the run's artifacts: runs:/<run>/<name> is the logged
    model of that name whose source run it is, when there is one."""
    run_id = run["info"]["run_id"]
    for output in (run.get("outputs") or {}).get("model_outputs") or []:
        model_id = output.get("model_id")
        if not model_id:
            continue
        found = server.get_json(f"/api/2.0/mlflow/logged-models/{quote(model_id)}", {}, missing=missing)["model"]
        info = found["info"]
        if info.get("name") == path and info.get("source_run_id", run_id) == run_id:
            return info["artifact_uri"]
    return None


def _proxied_path(server: Server, location: str) -> str:
    """The artifact location as a path under the server's artifact proxy; refused when the server does not proxy it."""
    parts = urlsplit(location)
    if parts.scheme != "mlflow-artifacts" or (parts.netloc and parts.netloc != server.netloc):
        where = location if len(location) <= 200 else location[:200] + "..."
        raise MlflowArtifactsNotProxied(
            f"the model's artifacts are at {where!r}, which the tracking server does not serve itself: ModelPress "
            "reads artifacts only through the server's artifact proxy (mlflow-artifacts:, `mlflow server "
            "--serve-artifacts`), never with access of its own")
    path = parts.path.strip("/")
    if not _safe_relative(path):
        raise MlflowArtifactsNotProxied(f"the model's artifact path {path[:200]!r} is not a plain relative path")
    return path


def _artifact_url(path: str) -> str:
    return "/api/2.0/mlflow-artifacts/artifacts/" + quote(path)


# --- the pull ------------------------------------------------------------------------------------

def pull(connection: MlflowConnection, uri: str, *, dest: Path, budget: Budget, allow_private: bool) -> Pulled:
    """Resolve, check the flavour, download. Files go under `dest` (the caller's scratch folder, removed after)."""
    parse(uri)  # a malformed URI is refused before any connection
    dest.mkdir(parents=True, exist_ok=True)
    server = Server(connection, allow_private=allow_private)
    try:
        location, origin, name = resolve(server, uri)
        folder = _proxied_path(server, location)

        def missing(message: str) -> Exception:
            return MlflowModelNotFound(f"{uri}: no MLflow model at {location} (no MLmodel file there: {message})",
                                       mlflow_uri=uri)

        mlmodel = dest / "MLmodel"
        server.download(_artifact_url(folder + "/MLmodel"), mlmodel, budget=Budget(MAX_MLMODEL_BYTES),
                        missing=missing)
        data = _onnx_data(mlmodel, uri)
        if not _safe_relative(data):
            raise InvalidModel(f"{uri}: the MLmodel file names its ONNX file {data[:200]!r}, outside the model's folder")

        def file_missing(message: str) -> Exception:
            return MlflowModelNotFound(f"{uri}: the model's file {data} is missing from its artifacts ({message})",
                                       mlflow_uri=uri)

        onnx_path = dest / "model.onnx"
        server.download(_artifact_url(f"{folder}/{data}"), onnx_path, budget=budget, missing=file_missing)
        external = _external_locations(onnx_path, uri)
        origin |= {"flavor": "onnx", "artifact": f"{location.rstrip('/')}/{data}"}
        if not external:
            return Pulled(onnx_path, "model.onnx", file_sha256(onnx_path), onnx_path.stat().st_size, name, origin)
        # External data: the .onnx and its files as one zip, the form an upload with external data takes.
        data_dir = PurePosixPath(data).parent
        archive = dest / "model.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
            zipped.write(onnx_path, "model.onnx")
            for location_name in external:
                part = dest / "part"
                server.download(_artifact_url(f"{folder}/{data_dir / location_name}".replace("/./", "/")), part,
                                budget=budget, missing=file_missing)
                zipped.write(part, location_name)
                part.unlink()
        onnx_path.unlink()
        return Pulled(archive, "model.zip", file_sha256(archive), archive.stat().st_size, name.removesuffix(".onnx") + ".zip",
                      origin)
    finally:
        server.close()


def _onnx_data(mlmodel: Path, uri: str) -> str:
    """The ONNX file the MLmodel's onnx flavour names; MlflowNotOnnx (listing the flavours it has) without one."""
    import yaml

    try:
        parsed = yaml.safe_load(mlmodel.read_text(errors="replace"))
    except yaml.YAMLError as exc:
        raise MlflowError(f"{uri}: its MLmodel file is not valid YAML ({str(exc)[:200]})") from None
    flavors = parsed.get("flavors") if isinstance(parsed, dict) else None
    if not isinstance(flavors, dict) or "onnx" not in flavors:
        found = ", ".join(sorted(str(f) for f in flavors)) if isinstance(flavors, dict) else "none"
        raise MlflowNotOnnx(f"{uri} is not an ONNX model: its MLmodel flavours are {found}; ModelPress pulls models "
                            "logged with the ONNX flavour (mlflow.onnx.log_model) only", flavors=
                            sorted(str(f) for f in flavors) if isinstance(flavors, dict) else [])
    data = (flavors["onnx"] or {}).get("data") if isinstance(flavors["onnx"], dict) else None
    if not isinstance(data, str) or not data:
        raise MlflowNotOnnx(f"{uri}: its onnx flavour names no model file (`data`)")
    return data


def _external_locations(onnx_path: Path, uri: str) -> list[str]:
    """The external-data files the downloaded model names (read without loading them), each a plain relative path."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # a corrupt protobuf: the upload's own checks word it
        raise InvalidModel(f"{uri}: its ONNX file does not parse ({type(exc).__name__}: {str(exc)[:200]})") from None
    locations: list[str] = []
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not _safe_relative(location):
            raise InvalidModel(f"{uri}: the model names external data {location[:200]!r} outside its folder")
        if location not in locations:
            locations.append(location)
    return locations
