from __future__ import annotations

import datetime as dt
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# MLflow's registered model names: letters, digits and a few separators (no slash: it would split models:/ URIs).
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MlflowSettingsIn(_Strict):
    """PUT /v1/integrations/mlflow: the tenant's tracking server, and a password (with username) or a token."""

    tracking_uri: str = Field(max_length=2048, description="The tracking server, http(s)://host[:port][/path]. "
                              "Hosts on loopback or private addresses are refused unless the operator allows them.",
                              examples=["https://mlflow.example.com"])
    username: str | None = Field(default=None, min_length=1, max_length=255,
                                 description="HTTP basic auth user (with `password`).")
    password: str | None = Field(default=None, min_length=1, max_length=4096,
                                 description="HTTP basic auth password; stored encrypted, never shown again.")
    token: str | None = Field(default=None, min_length=1, max_length=4096,
                              description="A bearer token instead of username and password; stored encrypted, "
                              "never shown again.")
    registered_model_prefix: str = Field(default="", max_length=100, description="Prepended to each job's "
                                         "`mlflow.register_as` (a team's namespace in a shared registry).")

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri(cls, value: str) -> str:
        from app.common import check_http_url

        parts = check_http_url(value, credentials=": give username and password (or token) as their own fields")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or a fragment")
        return value.rstrip("/")

    @field_validator("registered_model_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value and not MODEL_NAME.match(value):
            raise ValueError("may hold letters, digits, spaces and _ . - only, and must start with a letter or digit")
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> MlflowSettingsIn:
        if self.token is not None and (self.username is not None or self.password is not None):
            raise ValueError("give a token, or a username and password, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together (HTTP basic auth)")
        return self


class MlflowSettingsPublic(BaseModel):
    """The tenant's MLflow settings as the API shows them: never the password or token, only whether one is set."""

    tracking_uri: str
    username: str | None
    credential: Literal["password", "token"] | None = Field(
        description="Which credential is stored (encrypted; it is never shown again), or null for none.")
    registered_model_prefix: str
    created_at: dt.datetime
    updated_at: dt.datetime


class MlflowLog(_Strict):
    """A job's `mlflow` option: when it succeeds, log a run to the tenant's tracking server."""

    experiment: str = Field(default="modelpress", min_length=1, max_length=255,
                            description="The experiment the run goes to (created when absent).")
    register_as: str | None = Field(
        default=None, min_length=1, max_length=150,
        description="Register the compressed model (ONNX flavour) as a new version of this registered model, "
        "after the tenant's registered_model_prefix. Without it the model is logged to the run, not registered.")
    run_name: str | None = Field(default=None, min_length=1, max_length=250,
                                 description="The run's name; default: modelpress-<job id>.")

    @field_validator("register_as")
    @classmethod
    def _register_as(cls, value: str | None) -> str | None:
        if value is not None and not MODEL_NAME.match(value):
            raise ValueError("may hold letters, digits, spaces and _ . - only, and must start with a letter or digit")
        return value


class MlflowModelPull(_Strict):
    """POST /v1/models with a JSON body: pull a model from the tenant's MLflow registry instead of uploading it."""

    mlflow_uri: str = Field(max_length=1000, description="models:/<name>/<version>, models:/<name>@<alias> or "
                            "runs:/<run_id>/<path>; the model must have the ONNX flavour.",
                            examples=["models:/resnet50/3", "models:/resnet50@champion", "runs:/0a1b.../model"])
    name: str | None = Field(default=None, min_length=1, max_length=255,
                             description="The stored model's name; default: from the URI.")
