"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Everything the server refuses goes through ``OpenAIError`` (raised by the
serving layer, the routes or the middleware) so that clients written for
OpenAI read our errors the way they read OpenAI's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"

# How long a client should wait before retrying a refused request (seconds).
RETRY_AFTER_QUEUE_FULL_S = 1
RETRY_AFTER_UNAVAILABLE_S = 5


class OpenAIError(Exception):
    """An HTTP error the client is meant to read: status, message and the offending ``param``."""

    def __init__(self, status_code: int, message: str, *, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | int | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_json_bytes(message: str, type: str = INVALID_REQUEST, param: str | None = None,
                     code: str | int | None = None) -> bytes:
    return json.dumps(error_body(message, type, param, code)).encode()


def bad_request(param: str | None, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def queue_full(limit: int) -> OpenAIError:
    return OpenAIError(429, f"The server's request queue is full ({limit} requests waiting); retry later.",
                       type=RATE_LIMIT, code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_QUEUE_FULL_S)})


def engine_unavailable(reason: str) -> OpenAIError:
    return OpenAIError(503, f"The engine is not available: {reason}", type=SERVER_ERROR,
                       code="engine_unavailable", headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)})
