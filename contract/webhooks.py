"""Webhook signatures, stated once: the API signs each delivery, a receiver (attribution_client.verify)
checks it.

    X-Attribution-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

The timestamp is signed with the body, so a receiver can refuse replays older than a few minutes.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-Attribution-Signature"
TOLERANCE_S = 300


def sign(secret: str, body: bytes, at: int | None = None) -> str:
    """The signature header's value for `body` sent at `at` (now by default)."""
    at = int(time.time()) if at is None else at
    return f"t={at},v1={_mac(secret, body, at)}"


def _mac(secret: str, body: bytes, at: int) -> str:
    return hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str, tolerance_s: float = TOLERANCE_S) -> bool:
    """True when `header` signs `body` with `secret` and was made within `tolerance_s` of now."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if not fields.get("t", "").isdigit() or "v1" not in fields:
        return False
    at = int(fields["t"])
    return abs(time.time() - at) <= tolerance_s and hmac.compare_digest(_mac(secret, body, at), fields["v1"].strip())
