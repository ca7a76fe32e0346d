"""API keys, scopes and tenants.

    Authorization: Bearer fi_<key id>_<secret>

Keys live in an operator file (ATTR_API_KEYS_FILE, TOML; written by `python -m app.keys`), one table per
key id: its tenant, scopes and the sha256 of its secret, never the secret itself. A secret is 32 random
bytes, so a plain sha256 is a sound hash for it; the comparison is constant-time. The file is read again
when it changes, so keys are created, rotated and revoked without a restart. Scopes: `read` (views,
scores, reports, the registry), `submit` (requests, cancel and delete of the tenant's own jobs), `admin`.

Without a keys file, in development, every request is the one local tenant with every scope: zero setup
for one local user. A production API refuses to start that way (app.main).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from contract.problems import Forbidden, Unauthorized, Unavailable

SCOPES = ("read", "submit", "admin")
log = logging.getLogger("app.auth")
PREFIX = "fi"


@dataclass(frozen=True)
class Principal:
    tenant: str
    scopes: frozenset[str]
    key_id: str


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: Path | None, local_tenant: str):
        self.path, self.local = path, Principal(local_tenant, frozenset(SCOPES), "local")
        self._loaded: tuple[int, dict] = (-1, {})

    def _keys(self) -> dict:
        mtime = self.path.stat().st_mtime_ns if self.path.exists() else 0
        if mtime != self._loaded[0]:
            try:
                keys = tomllib.loads(self.path.read_text()).get("keys", {}) if mtime else {}
                if not isinstance(keys, dict) or not all(isinstance(k, dict) and "tenant" in k for k in keys.values()):
                    raise ValueError("expected [keys.<id>] tables with a tenant")
            except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError is a ValueError
                log.error("the API keys file %s cannot be read: %s", self.path, exc)
                raise Unavailable("the API keys file cannot be read; the operator must fix it", 30) from None
            self._loaded = (mtime, keys)
        return self._loaded[1]

    def authenticate(self, token: str | None) -> Principal:
        if self.path is None:
            return self.local
        if not token:
            raise Unauthorized("an API key is required: Authorization: Bearer <key>")
        prefix, _, rest = token.partition("_")
        key_id, _, secret = rest.partition("_")
        entry = self._keys().get(key_id) if prefix == PREFIX else None
        stored = entry.get("sha256", "") if entry else "0" * 64
        if not hmac.compare_digest(digest(secret), stored) or entry is None:
            raise Unauthorized("unknown or revoked API key")
        return Principal(entry["tenant"], frozenset(entry.get("scopes", ())), key_id)


# The OpenAPI document declares this scheme on every /v1 operation (app.main); the dependency below reads
# the header itself, one dependency instead of two on the hot path.
SECURITY_SCHEME = {"type": "http", "scheme": "bearer", "description": "an API key: Bearer fi_<id>_<secret>"}


def require(scope: str):
    """A dependency: the caller's principal, refused (401/403) unless its key has `scope`."""

    async def principal(request: Request) -> Principal:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        who = request.app.state.keys.authenticate(token.strip() if scheme.lower() == "bearer" else None)
        if scope not in who.scopes:
            raise Forbidden(f"this API key lacks the {scope!r} scope")
        return who

    return Depends(principal)


Reader = Annotated[Principal, require("read")]
Submitter = Annotated[Principal, require("submit")]


def new_key() -> tuple[str, str, str]:
    """(key id, secret, the key as a client sends it)."""
    key_id, secret = os.urandom(4).hex(), os.urandom(32).hex()
    return key_id, secret, f"{PREFIX}_{key_id}_{secret}"
