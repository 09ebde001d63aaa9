"""``/v1/completions`` and ``/v1/chat/completions`` over an :class:`~tessera.runtime.llm.async_engine.AsyncLLMEngine`.

A request becomes ``len(prompts) x n`` engine requests, validated and queued
together (all or none: a 400 or a 429 queues nothing). Choice ``i`` of a
seeded request samples with seed ``seed + i`` (so ``n=1`` with ``seed=S``
gives exactly what ``generate(prompt, SamplingParams(seed=S))`` gives through
the Python API); without a seed each choice draws its own. Chat prompts are
the checkpoint's chat template rendered with jinja2 (:mod:`.chat_template`)
and tokenized without adding special tokens (the template has them); the
template's ``eos_token`` also stops a chat request.

Streaming is server-sent events: one ``data: {chunk}`` per delivery, then
``data: [DONE]``. A client that disconnects (streaming or not) cancels the
handler, which aborts every engine request of the call: their KV blocks are
free at the next step boundary. Defaults follow the OpenAI API: temperature
1, top_p 1, ``max_tokens`` 16 for completions and the rest of the context
for chat.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator, Sequence

from tessera.launch.serve.chat_template import ChatTemplate, ChatTemplateError
from tessera.launch.serve.metrics import ServeMetrics
from tessera.launch.serve.schemas import ChatCompletionRequest, CompletionRequest, error_body, usage
from tessera.launch.serve.text import TextProcessor
from tessera.options import SamplingParams
from tessera.runtime.llm.async_engine import AsyncLLMEngine, Output, RequestStream, Submission


class ApiError(Exception):
    """An error answered with an HTTP status and the OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_, code, param)
        self.headers = headers or {}


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


@dataclasses.dataclass
class _Choice:
    """What one choice collected: its tokens, text and end."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    generated: int = 0


class LLMService:
    """The language-model endpoints of one server (one engine, one served model name)."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, metrics: ServeMetrics,
                 chat_template: ChatTemplate | None) -> None:
        self.engine = engine
        self.llm = engine.engine
        self.tokenizer = self.llm.tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.chat_template = chat_template
        self.max_model_len = self.llm.options.max_model_len
        eos = chat_template.special_tokens.get("eos_token") if chat_template else None
        self.chat_eos = self.tokenizer.token_to_id(eos) if (eos and self.tokenizer is not None) else None

    # -- endpoints ----------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest) -> tuple[Any, bool]:
        """(JSON body, False) or (an async iterator of SSE bytes, True)."""
        started = time.monotonic()
        self._check_model(body.model)
        prompts = [self._tokens(p, add_special=True) for p in body.prompts()]
        return await self._run("completions", body, prompts, default_max=16, started=started)

    async def chat(self, body: ChatCompletionRequest) -> tuple[Any, bool]:
        started = time.monotonic()
        self._check_model(body.model)
        if self.chat_template is None:
            raise ApiError(400, f"the model {self.model_name!r} has no chat template (no chat_template in its "
                           "tokenizer_config.json or chat_template.jinja); use /v1/completions with a plain prompt",
                           code="no_chat_template")
        try:
            messages = [m.for_template() for m in body.messages]
            text = self.chat_template.render(messages, add_generation_prompt=body.add_generation_prompt,
                                             **(body.chat_template_kwargs or {}))
        except (ChatTemplateError, ValueError) as err:
            raise ApiError(400, str(err), param="messages") from None
        prompt = self._tokens(text, add_special=False)
        return await self._run("chat", body, [prompt], default_max=None, started=started)

    # -- the shared path ----------------------------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist here; this server serves {self.model_name!r}",
                           code="model_not_found", param="model")

    def _tokens(self, prompt: Any, add_special: bool) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "this checkpoint has no tokenizer.json, so prompts must be token ids", param="prompt")
            return list(self.tokenizer.encode(prompt, add_special_tokens=add_special).ids)
        return list(prompt)

    def _sampling(self, body, prompt_len: int, default_max: int | None, index: int) -> SamplingParams:
        max_tokens = body.max_new_tokens if isinstance(body, ChatCompletionRequest) else body.max_tokens
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = default_max if default_max is not None else room
        if room < 1 or prompt_len + max_tokens > self.max_model_len:
            raise ApiError(400, f"this model's context is {self.max_model_len} tokens; the prompt has {prompt_len} "
                           f"and max_tokens asks for {max_tokens} more; shorten the prompt or lower max_tokens",
                           code="context_length_exceeded", param="max_tokens")
        stop_ids = body.stop_ids
        if isinstance(body, ChatCompletionRequest) and self.chat_eos is not None:
            stop_ids = stop_ids + (self.chat_eos,)
        top_k = body.top_k if body.top_k not in (None, -1) else 0
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_k=top_k, top_p=1.0 if body.top_p is None else body.top_p,
                seed=None if body.seed is None else (body.seed + index) % 2**63,
                stop_token_ids=stop_ids,
            )
        except ValueError as err:
            raise ApiError(400, str(err)) from None

    async def _run(self, endpoint: str, body, prompts: list[list[int]], default_max: int | None,
                   started: float) -> tuple[Any, bool]:
        subs = []
        for ids in prompts:
            for j in range(body.n):
                processor = TextProcessor(self.tokenizer, body.stop_strings) if self.tokenizer is not None else None
                subs.append(Submission(ids, self._sampling(body, len(ids), default_max, j), processor))
        streams = self.engine.submit(subs)  # ValueError -> 400, QueueFull -> 429 (the app maps them)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        prompt_tokens = sum(len(p) for p in prompts)
        rid = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            return self._stream(endpoint, body, streams, rid, created, prompt_tokens, prompts, started), True
        try:
            choices = await self._collect(streams, started)
        finally:
            for s in streams:
                s.abort()
        failed = [c for c in choices if c.finish_reason == "error"]
        if failed:
            raise ApiError(500, f"the engine failed this request: {failed[0].error}", type_="server_error",
                           code="engine_error")
        self.metrics.e2e.labels(endpoint=endpoint).observe(time.monotonic() - started)
        return self._response(endpoint, body, choices, rid, created, prompt_tokens, prompts), False

    async def _collect(self, streams: Sequence[RequestStream], started: float) -> list[_Choice]:
        async def one(stream: RequestStream) -> _Choice:
            c = _Choice()
            last = None
            async for out in stream:
                self._observe(out, last, started)
                last = out.time if out.token_ids else last
                c.tokens.extend(out.token_ids)
                c.text.append(out.text)
                if out.finished:
                    c.finish_reason, c.error, c.generated = out.finish_reason, out.error, out.num_generated
            return c

        return list(await asyncio.gather(*(one(s) for s in streams)))

    def _observe(self, out: Output, last: float | None, started: float) -> None:
        """Token counts, time to first token and inter-token latency of one delivery of a stream."""
        n = len(out.token_ids)
        if not n:
            return
        self.metrics.generation_tokens.inc(n)
        if last is None:
            self.metrics.ttft.observe(max(0.0, out.time - started))
            gaps, per = n - 1, 0.0  # tokens delivered together with the first one (a multi-step decode)
        else:
            gaps, per = n, max(0.0, out.time - last) / n
        for _ in range(gaps):
            self.metrics.itl.observe(per)

    def _response(self, endpoint, body, choices: list[_Choice], rid, created, prompt_tokens, prompts) -> dict:
        out_choices = []
        for i, c in enumerate(choices):
            reason = "stop" if c.finish_reason == "stop" else "length"
            choice: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": reason}
            text = "".join(c.text)
            if endpoint == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            if body.return_token_ids:
                choice["token_ids"] = c.tokens
            out_choices.append(choice)
        resp: dict[str, Any] = {
            "id": rid, "object": "chat.completion" if endpoint == "chat" else "text_completion", "created": created,
            "model": self.model_name, "choices": out_choices,
            "usage": usage(prompt_tokens, sum(c.generated for c in choices)),
        }
        if body.return_token_ids:
            resp["prompt_token_ids"] = prompts if len(prompts) > 1 else prompts[0]
        return resp

    async def _stream(self, endpoint, body, streams: list[RequestStream], rid, created, prompt_tokens, prompts,
                      started) -> AsyncIterator[bytes]:
        chat = endpoint == "chat"
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": kind, "created": created, "model": self.model_name}
        generated = [0] * len(streams)
        last: list[float | None] = [None] * len(streams)
        status = 200
        try:
            if chat:
                for i in range(len(streams)):
                    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
            async for i, out in _merge(streams):
                self._observe(out, last[i], started)
                if out.token_ids:
                    last[i] = out.time
                generated[i] = out.num_generated
                if out.finished and out.finish_reason == "error":
                    status = 500
                    yield sse(error_body(f"the engine failed this request: {out.error}", "server_error",
                                         "engine_error"))
                    continue
                if not (out.text or out.finished or (body.return_token_ids and out.token_ids)):
                    continue
                reason = None
                if out.finished:
                    reason = "stop" if out.finish_reason == "stop" else "length"
                choice: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": reason}
                if chat:
                    choice["delta"] = {"content": out.text} if out.text else {}
                else:
                    choice["text"] = out.text
                if body.return_token_ids:
                    choice["token_ids"] = list(out.token_ids)
                yield sse({**head, "choices": [choice]})
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": usage(prompt_tokens, sum(generated))})
            yield SSE_DONE
            self.metrics.e2e.labels(endpoint=endpoint).observe(time.monotonic() - started)
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away
            raise
        finally:
            for s in streams:
                s.abort()
            self.metrics.request(endpoint, status)


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Output]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        async for out in stream:
            queue.put_nowait((i, out))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, out = await queue.get()
            if out.finished:
                left -= 1
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
