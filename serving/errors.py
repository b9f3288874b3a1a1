"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status."""
from __future__ import annotations

from typing import Any

from .events import Failed


class APIError(Exception):
    """An error the client should see as is. `status` picks the HTTP code; the rest is the body."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers or {}  # e.g. Retry-After on a 429
        self.status = status
        self.message = message
        self.type = type or _default_type(status)
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_event(self) -> Failed:
        """The engine's stream event for this error."""
        return Failed(self.status, self.message, self.type, self.param, self.code)

    @classmethod
    def from_event(cls, event: Failed) -> "APIError":
        return cls(event.status, event.message, type=event.error_type, param=event.param, code=event.code)


def _default_type(status: int) -> str:
    # OpenAI answers every client error (401 and 404 included) with type invalid_request_error
    if status == 429:
        return "rate_limit_error"
    if status == 403:
        return "permission_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)
