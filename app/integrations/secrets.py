"""Credentials a tenant stores, encrypted at rest with Fernet (AES-128-CBC and HMAC-SHA256, from `cryptography`).

The key is MODELPRESS_SECRET_KEY (a comma-separated list rotates: the first encrypts, each decrypts). In local mode
without it, a key is generated once into the data folder (`secret.key`, mode 0600), beside the SQLite database
it protects: the embedded deployment keeps working with no setting, and a copy of the database alone does not
reveal the credentials. A production server without the key refuses to store or read a credential.
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from app.errors import MlflowCredentialsUnreadable, SecretKeyMissing
from app.settings import Settings

KEY_FILE = "secret.key"


def _local_key(folder: Path) -> bytes:
    """The embedded deployment's key, created on first use (O_EXCL: two processes starting at once agree on one)."""
    path = folder / KEY_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


def _fernet(settings: Settings) -> MultiFernet:
    configured = [k.strip() for k in settings.secret_key.get_secret_value().split(",") if k.strip()]
    if not configured:
        if settings.mode != "local":
            raise SecretKeyMissing("this server has no MODELPRESS_SECRET_KEY to encrypt credentials with; an "
                                   "administrator must set it (a Fernet key: python -c 'from cryptography.fernet "
                                   "import Fernet; print(Fernet.generate_key().decode())') on the API and the workers")
        return MultiFernet([Fernet(_local_key(settings.data_path))])
    try:
        return MultiFernet([Fernet(key.encode()) for key in configured])
    except ValueError:
        raise SecretKeyMissing("MODELPRESS_SECRET_KEY is not a valid Fernet key (urlsafe base64 of 32 bytes); an "
                               "administrator must set a valid one") from None


def encrypt(settings: Settings, plaintext: str) -> str:
    return _fernet(settings).encrypt(plaintext.encode()).decode()


def decrypt(settings: Settings, token: str) -> str:
    try:
        return _fernet(settings).decrypt(token.encode()).decode()
    except InvalidToken:
        raise MlflowCredentialsUnreadable(
            "the stored MLflow credential cannot be decrypted with this server's secret key (MODELPRESS_SECRET_KEY "
            "was changed); set the credentials again with PUT /v1/integrations/mlflow") from None
