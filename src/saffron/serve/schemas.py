"""The request body of ``POST /v1/chat/completions`` (OpenAI's shape plus a ``saffron`` object) and the errors.

Every standard chat-completions field an OpenAI client may send is accepted. Those this server implements:
``messages``, ``model``, ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``n`` (1 only),
``seed``, ``stream``, ``stream_options``, ``stop``. Those it cannot honour (tools, logprobs, penalties, ...) are
accepted at their neutral value (what a client sends when it does not use them) and refused otherwise, so no
request is silently answered differently from what it asked. Anything else is refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from saffron.errors import BusyError, SaffronError

MAX_BODY_BYTES = 1 << 20


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, e: SaffronError, param: str | None = None, code: str | None = None,
           message: str | None = None) -> ApiError:
        """The answer to ``e``, chosen by its type: status and default code come from the error class."""
        return cls(e.http_status, str(e) if message is None else message, param=param,
                   code=code if code is not None else e.api_code,
                   type="server_error" if e.http_status >= 500 else "invalid_request_error",
                   headers={"Retry-After": "1"} if isinstance(e, BusyError) else None)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Any
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> str | list[dict[str, str]]:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) and not set(p) - {"type", "text"} for p in v):
            return v
        raise ValueError('must be a string or a list of text parts ({"type": "text", "text": "..."})')

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p["text"] for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None


def _is_none_or(*neutral: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or any(v == n for n in neutral)


# Standard fields this server cannot honour: accepted only at a value that asks for nothing.
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": _is_none_or(0),
    "presence_penalty": _is_none_or(0),
    "logit_bias": _is_none_or({}),
    "logprobs": _is_none_or(False),
    "top_logprobs": _is_none_or(0),
    "tools": _is_none_or([]),
    "tool_choice": _is_none_or("none", "auto"),
    "functions": _is_none_or([]),
    "function_call": _is_none_or("none", "auto"),
    "response_format": _is_none_or({"type": "text"}),
    "modalities": _is_none_or(["text"]),
    "audio": _is_none_or(),
    "prediction": _is_none_or(),
    "web_search_options": _is_none_or(),
}


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage]
    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: StrictInt | None = None
    seed: StrictInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    saffron: dict[str, Any] | None = None  # the extension: {"method": ..., "judge": bool, method options...}
    # accepted and ignored (they do not change the answer)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    parallel_tool_calls: StrictBool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    # accepted only at their neutral value (see NEUTRAL)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: Any) -> tuple[str, str]:
    """One pydantic error as (message, param), worded for a client."""
    loc = tuple(err["loc"])
    param = _param(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return (f"unknown field '{param}': not a chat-completions parameter this server knows (method options "
                    "go in the 'saffron' object)"), param
        return f"unknown field '{param}'", param
    if kind == "missing":
        return f"'{param}' is required", param
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{param}: {msg}" if param else msg, param


def parse_request(body: bytes) -> ChatCompletionRequest:
    """Parse and validate a request body; every problem is an ``ApiError`` (400, or 413 if too large)."""
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body of {len(body)} bytes exceeds this server's limit of {MAX_BODY_BYTES}")
    try:
        data = json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        msg, param = _message(e.errors()[0])
        n = e.error_count()
        if n > 1:
            msg += f" (and {n - 1} more problem{'s' if n > 2 else ''})"
        raise ApiError(400, msg, param=param or None) from None
    for name, ok in NEUTRAL.items():
        value = getattr(req, name)
        if not ok(value):
            raise ApiError(400, f"{name}={json.dumps(value)} is not supported by this server (it searches over plain "
                           "text completions); omit it", param=name, code="unsupported_parameter")
    return req
