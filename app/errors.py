"""The service's errors, rendered as application/problem+json by one handler (app.main).

    ServiceError (500)
    ├── NotFound (404)            unknown model, dataset, record or job
    ├── InvalidInput (422)        input that does not fit the model or the settings
    ├── PayloadTooLarge (413)     too many test points, too large a body
    ├── Conflict (409)            an operation the job's state does not allow
    └── Unavailable (503)         Redis unreachable (redis errors are translated to this at one place)

Messages are precise and safe to show: never a traceback.
"""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    title = "Internal error"

    def __init__(self, detail: str, errors: list[dict] | None = None):
        super().__init__(detail)
        self.detail, self.errors = detail, errors


class NotFound(ServiceError):
    status, title = 404, "Not found"


class InvalidInput(ServiceError):
    status, title = 422, "Invalid input"


class PayloadTooLarge(ServiceError):
    status, title = 413, "Payload too large"


class Conflict(ServiceError):
    status, title = 409, "Conflict"


class Unavailable(ServiceError):
    status, title = 503, "Service unavailable"
