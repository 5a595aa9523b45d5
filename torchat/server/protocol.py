"""The OpenAI API's request bodies (validated with pydantic, strictly typed as the API is), its error shape and its
response objects, for /v1/chat/completions and /v1/completions.

Every refusal is an `APIError`, answered as {"error": {"message", "type", "param", "code"}} with a 4xx status.
Fields the API has and torchat does not use (presence_penalty, user, ...) are accepted and ignored, as
llama.cpp's server does; `n` other than 1 is refused.
"""

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """A refusal in the API's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Request(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop: at most 4 sequences, got {len(stops)}", "stop")
        return stops


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def conversation(self) -> list[dict]:
        # "developer" is the newer API's name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    echo: bool | None = None
    suffix: str | None = None


FIELDS = set(ChatRequest.model_fields) | set(CompletionRequest.model_fields) | set(Message.model_fields) | {
    "include_usage", "text", "type"}


def parse_request(kind: type[_Request], body) -> _Request:
    """The validated request, or an APIError naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}", None,
                       "invalid_type")
    try:
        request = kind.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        # pydantic's location also names the union member it tried ('str', 'list[TextPart]'); the API's does not
        path = [p for p in first["loc"] if isinstance(p, int) or p in FIELDS]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or None
        code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param, code) from None
    if request.n not in (None, 1):
        raise APIError(400, f"n={request.n}: this server returns one choice per request; send n=1", "n",
                       "unsupported_value")
    return request


# --- responses ---------------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """The response objects of one request: whole (`complete`) or as stream chunks (`chunk`, `usage_chunk`)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())

    def _envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def complete(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return {**self._envelope(obj), "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False,
              include_usage: bool = False) -> dict:
        """A stream chunk; the chat API's first one carries the role, its last one an empty delta."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = {**self._envelope("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = {**self._envelope("text_completion"), "choices": [choice]}
        if include_usage:
            body["usage"] = None  # the API sends usage null on every chunk but the last
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
