"""The OpenAI request schemas (pydantic 2) and the bodies of responses and errors.

Requests are parsed into these models at the edge: a wrong type, a value out
of range or an unknown field is a 400 with the OpenAI error body naming the
field. Fields the OpenAI API defines but tessera does not implement
(``logprobs``, ``echo``, penalties, ``logit_bias``, tools, ``best_of`` > 1,
``suffix``) are accepted only at their neutral value, so a client never gets
an answer computed differently from what it asked for.

Extensions (as vLLM names them): ``top_k``, ``stop_token_ids``,
``return_token_ids`` (token ids in each choice: ``token_ids``, and
``prompt_token_ids``), ``chat_template_kwargs`` and ``add_generation_prompt``
(chat), ``steps``, ``guidance_scale``, ``seed``, ``mode`` and
``negative_prompt`` (images). ``stop`` takes strings and token ids.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 64
MAX_STOP = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[Union[str, int]], None] = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        items = [value] if isinstance(value, str) else list(value or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(isinstance(s, str) and not s for s in items):
            raise ValueError("a stop string may not be empty")
        if any(isinstance(s, int) and (isinstance(s, bool) or s < 0) for s in items):
            raise ValueError("a stop token id must be an integer >= 0")
        return items

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, value):
        if value is not None and any(t < 0 for t in value):
            raise ValueError("stop token ids must be >= 0")
        return value

    @model_validator(mode="after")
    def _unsupported(self):
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; leave them at 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported; leave it out")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(s for s in self.stop or () if isinstance(s, str))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(s for s in self.stop or () if isinstance(s, int)) + tuple(self.stop_token_ids or ())


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_only(self):
        if self.echo:
            raise ValueError("echo is not supported; leave it false")
        if self.logprobs is not None:
            raise ValueError("logprobs is not supported; leave it out")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (it must equal n when given)")
        if self.suffix:
            raise ValueError("suffix is not supported; leave it out")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list; give a string, token ids, or a list of them")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return [x if isinstance(x, str) else list(x) for x in p]  # type: ignore[union-attr]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... reach the template as given

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def for_template(self) -> dict[str, Any]:
        """The message as a template sees it (text parts joined: templates expect a string)."""
        out = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            kinds = {p.type for p in self.content} - {"text"}
            if kinds:
                raise ValueError(f"message content of type {sorted(kinds)[0]!r} is not supported; send text")
            out["content"] = "".join(p.text or "" for p in self.content)
        return out


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _chat_only(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs is not supported; leave it false")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools are not supported by this server; leave tools and tool_choice out")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError("response_format other than {\"type\": \"text\"} is not supported")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; give one")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ImageRequest(BaseModel):
    """POST /v1/images/generations (b64_json PNGs)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=16)
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    user: str | None = None
    steps: int | None = Field(default=None, ge=1, le=1000)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=100.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    mode: Literal["exact", "displaced", "partial", "ulysses"] | None = None
    negative_prompt: str | None = None

    @field_validator("size")
    @classmethod
    def _size(cls, value):
        if value is None:
            return value
        parts = value.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and 0 < int(p) <= 4096 for p in parts):
            raise ValueError(f"size {value!r} must look like 512x512 (width x height, each 1..4096)")
        return value

    def dimensions(self, default: tuple[int, int]) -> tuple[int, int]:
        """(width, height)."""
        if self.size is None:
            return default
        w, h = self.size.lower().split("x")
        return int(w), int(h)


# -- response and error bodies ---------------------------------------------------------------------------------


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
