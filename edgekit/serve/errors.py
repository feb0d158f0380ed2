"""OpenAI-style API errors: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Everything a client can cause is one of these (never a 500); they are raised anywhere in the
request path and turned into a response by one handler in ``app.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgekit.errors import EdgekitError

# HTTP status -> OpenAI error type (the values the official clients map to exception classes).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "timeout_error",
    507: "server_error",
}


class ApiError(EdgekitError):
    """An error answered to an HTTP client."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self, models_dir: Path | None = None) -> dict:
        """The response body; ``models_dir``: server paths under it are shown relative to it (clients see no server paths)."""
        message = self.message if models_dir is None else public_message(self.message, models_dir)
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}


def public_message(message: str, models_dir: Path) -> str:
    """``message`` with the models folder's absolute path left out (bundle-relative names stay)."""
    for prefix in sorted({str(models_dir.resolve()), str(models_dir.absolute()), str(models_dir)}, key=len, reverse=True):
        message = message.replace(prefix + os.sep, "")
    return message


def bad_param(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)
