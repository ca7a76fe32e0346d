"""The service's problems (RFC 9457 application/problem+json), one class per status: raised by the API
(rendered by one handler, app.main) and by the client when such an answer arrives (attribution_client).

    ServiceError (500)
    ├── BadRequest (400)          a body that is not JSON at all
    ├── Unauthorized (401)        no API key, or an unknown one (WWW-Authenticate: Bearer)
    ├── Forbidden (403)           a key without the scope the operation needs
    ├── NotFound (404)            unknown model, dataset, record or job (another tenant's job too)
    ├── Conflict (409)            an operation the job's state does not allow
    ├── PayloadTooLarge (413)     too many test points, too large a body
    ├── InvalidInput (422)        input that does not fit the model or the settings
    ├── TooManyRequests (429)     a key's rate limit or a tenant's concurrent-job cap (Retry-After)
    └── Unavailable (503)         Redis unreachable, the queue full (Retry-After), a broken registry entry

Messages are precise and safe to show: never a traceback, never a server path.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "BadRequest",
    "Conflict",
    "Forbidden",
    "InvalidInput",
    "NotFound",
    "PayloadTooLarge",
    "ServiceError",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
]


class ServiceError(Exception):
    status = 500
    title = "Internal error"

    def __init__(self, detail: str, errors: list[dict] | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail, self.errors, self.headers = detail, errors, headers or {}

    @property
    def retry_after_s(self) -> int | None:
        value = self.headers.get("Retry-After") or self.headers.get("retry-after")
        return int(value) if value and value.isdigit() else None

    @classmethod
    def from_problem(cls, body: Mapping, headers: Mapping[str, str] | None = None) -> ServiceError:
        """The exception of a problem+json answer (its status's class; ServiceError for any other)."""
        status = int(body.get("status") or 500)
        kind = next((c for c in cls.__subclasses__() if c.status == status), ServiceError)
        error = Exception.__new__(kind)
        ServiceError.__init__(error, str(body.get("detail", "")), body.get("errors"), dict(headers or {}))
        if kind is ServiceError:
            error.status, error.title = status, str(body.get("title", "Error"))
        return error


class BadRequest(ServiceError):
    status, title = 400, "Bad request"


class Unauthorized(ServiceError):
    status, title = 401, "Unauthorized"

    def __init__(self, detail: str):
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    status, title = 403, "Forbidden"


class NotFound(ServiceError):
    status, title = 404, "Not found"


class Conflict(ServiceError):
    status, title = 409, "Conflict"


class PayloadTooLarge(ServiceError):
    status, title = 413, "Payload too large"


class UnsupportedMediaType(ServiceError):
    status, title = 415, "Unsupported media type"


class InvalidInput(ServiceError):
    status, title = 422, "Invalid input"


class TooManyRequests(ServiceError):
    status, title = 429, "Too many requests"

    def __init__(self, detail: str, retry_after_s: int):
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after_s))})


class Unavailable(ServiceError):
    status, title = 503, "Service unavailable"

    def __init__(self, detail: str, retry_after_s: int):
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after_s))})
