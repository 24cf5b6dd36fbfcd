"""The ModelPress Python client: httpx only, importable without torch, numpy or the service's code."""
from app.client.client import (
    ChecksumMismatch,
    Client,
    Conflict,
    InvalidRequest,
    ModelPressError,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    Unreachable,
)

__all__ = [
    "ChecksumMismatch", "Client", "Conflict", "InvalidRequest", "ModelPressError", "NotFound", "RateLimited",
    "ServerError", "Unauthorized", "Unreachable",
]
