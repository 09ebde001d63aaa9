"""Serving parts without a server: the chat template against transformers, text and stop strings, the request
schemas, the options' secure defaults, the bearer check, and the async engine loop on a real one-rank engine
(concurrent consumers equal to requests run alone, aborts free KV blocks, the waiting bound, a failing step
failing only its requests, a checkpoint without a chat template answered with 400)."""

from __future__ import annotations

import asyncio
import json

import pytest

from tessera.errors import ConfigError
from tessera.launch.serve.auth import bearer_ok
from tessera.launch.serve.chat_template import ChatTemplate, ChatTemplateError
from tessera.launch.serve.options import ServeOptions
from tessera.launch.serve.schemas import ChatCompletionRequest, CompletionRequest, ImageRequest
from tessera.launch.serve.text import IncrementalDetokenizer, TextProcessor
from tessera.models.tiny_moe import build_tiny_moe
from tessera.options import SamplingParams
from tessera.runtime.llm.async_engine import AsyncLLMEngine, QueueFull, Submission
from tessera.runtime.llm.engine import LLMEngine
from tessera.tests.llm_testing import local_controller  # noqa: F401 - fixture

MESSAGES = [{"role": "system", "content": "the router sends every token"},
            {"role": "user", "content": "a tessera is one tile"},
            {"role": "assistant", "content": "of a mosaic"},
            {"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_moe("qwen3_moe", tmp_path_factory.mktemp("units") / "qwen3", tokenizer=True, max_positions=256)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny / "tokenizer.json"))


# -- chat templates -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(tiny, generation_prompt):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tiny)
    want = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)
    template = ChatTemplate.load(tiny)
    assert template.render(MESSAGES, add_generation_prompt=generation_prompt) == want
    assert want.startswith("<s>system: the router")  # the special tokens reach the template


def test_chat_template_of_a_released_model_renders_as_transformers(tmp_path):
    """A real-world template (loops, namespace, tojson, raise_exception) from a transformers tokenizer."""
    from transformers import AutoTokenizer

    source = (
        "{%- set ns = namespace(system=none) -%}"
        "{%- for m in messages -%}{%- if m.role == 'system' -%}{%- set ns.system = m.content -%}{%- endif -%}{%- endfor -%}"
        "{%- if ns.system is not none -%}<|system|>{{ ns.system | trim }}\n{%- endif -%}"
        "{%- for m in messages if m.role != 'system' -%}"
        "{%- if loop.index0 > 5 -%}{%- break -%}{%- endif -%}"
        "<|{{ m.role }}|>{{ m.content }}{{ eos_token }}\n"
        "{%- endfor -%}{{ {'n': messages | length, 'ü': 'é<>'} | tojson }}"
        "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
    )
    src = build_tiny_moe("qwen3_moe", tmp_path / "base", tokenizer=True)
    (tmp_path / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
         "chat_template": [{"name": "default", "template": source}, {"name": "tool_use", "template": "x"}]}))
    ref = AutoTokenizer.from_pretrained(tmp_path)
    want = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.load(tmp_path).render(MESSAGES) == want
    assert '"ü": "é<>"' in want  # transformers' tojson: no ASCII or HTML escaping


def test_chat_template_errors_are_clear(tiny, tmp_path):
    template = ChatTemplate.load(tiny)
    with pytest.raises(ChatTemplateError, match="knows no role tool"):
        template.render([{"role": "tool", "content": "x"}])
    assert ChatTemplate.load(tmp_path) is None  # no tokenizer_config.json: no template
    # The sandbox refuses Python internals and mutating the caller's objects (a 400, not a crash or an escape).
    for source in ("{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}"):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": source}))
        with pytest.raises(ChatTemplateError, match="unsafe"):
            ChatTemplate.load(tmp_path).render([{"role": "user", "content": "x"}])


# -- text ---------------------------------------------------------------------------------------------------


def test_incremental_detokenization_adds_up_to_the_full_decode(tokenizer):
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog while the model writes").ids + [2, 0, 5]
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.add(t) for t in ids) + detok.flush()
    assert text == tokenizer.decode(ids)


def _stream(tokenizer, ids, stop):
    proc = TextProcessor(tokenizer, stop)
    pieces, stopped = [], False
    for t in ids:
        delta, stopped = proc.feed(t)
        pieces.append(delta)
        if stopped:
            break
    if not stopped:
        pieces.append(proc.flush())
    return pieces, stopped


def test_stop_strings_cut_the_text_and_never_leak_while_streaming(tokenizer):
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog").ids
    full = tokenizer.decode(ids)
    pieces, stopped = _stream(tokenizer, ids, ["jumps over"])
    assert stopped and "".join(pieces) == full[: full.index("jumps over")]
    assert not any("jump" in p for p in pieces)  # the held-back prefix of the stop string was never sent
    pieces, stopped = _stream(tokenizer, ids, ["lazy cat", "zebra"])  # a prefix that never completes is released
    assert not stopped and "".join(pieces) == full
    pieces, stopped = _stream(tokenizer, ids, ["q"])  # a stop string inside one token
    assert stopped and "".join(pieces) == full[: full.index("q")]


# -- schemas, options, auth ---------------------------------------------------------------------------------


def test_request_schemas_accept_the_openai_forms_and_refuse_what_is_not_implemented():
    assert CompletionRequest(model="m", prompt="hi").prompts() == ["hi"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    req = CompletionRequest(model="m", prompt="hi", stop=["a", 7], stop_token_ids=[9])
    assert req.stop_strings == ("a",) and req.stop_ids == (7, 9)
    assert CompletionRequest(model="m", prompt="hi", stop="x").stop_strings == ("x",)
    for bad in ({"echo": True}, {"logprobs": 2}, {"best_of": 3}, {"presence_penalty": 0.5}, {"n": 0},
                {"temperature": -1}, {"top_p": 0}, {"stop": [""]}, {"unknown_field": 1}, {"prompt": []},
                {"stream_options": {"include_usage": True}}):
        with pytest.raises(ValueError):
            CompletionRequest(**{"model": "m", "prompt": "hi", **bad})
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                  {"type": "text", "text": "b"}]}],
                                 max_completion_tokens=5)
    assert chat.messages[0].for_template()["content"] == "ab" and chat.max_new_tokens == 5
    for bad in ({"tools": [{"type": "function"}]}, {"logprobs": True}, {"messages": []},
                {"response_format": {"type": "json_object"}}):
        with pytest.raises(ValueError):
            ChatCompletionRequest(**{"model": "m", "messages": [{"role": "user", "content": "x"}], **bad})
    assert ImageRequest(prompt="x", size="64x32").dimensions((8, 8)) == (64, 32)
    for bad in ({"size": "64"}, {"response_format": "url"}, {"n": 0}, {"prompt": ""}):
        with pytest.raises(ValueError):
            ImageRequest(**{"prompt": "x", **bad})


def test_server_options_are_secure_by_default():
    assert ServeOptions().host == "127.0.0.1"
    with pytest.raises(ConfigError, match="needs an API key"):
        ServeOptions(host="0.0.0.0")
    assert "sekrit" not in repr(ServeOptions(host="0.0.0.0", api_key="sekrit"))
    for bad in ({"host": "example.com"}, {"port": 0}, {"api_key": "has space"}, {"max_waiting": -1},
                {"served_model_name": "../x"}, {"retry_after_s": 0}, {"max_image_batch": 0},
                {"image_batching": "approx"}):
        with pytest.raises(ConfigError):
            ServeOptions(**bad)
    assert ServeOptions(host="::1").url == "http://[::1]:8000"


def test_bearer_check():
    assert bearer_ok(None, None) and bearer_ok("whatever", None)
    assert bearer_ok("Bearer k3y", "k3y") and bearer_ok("bearer  k3y ", "k3y")
    assert not bearer_ok(None, "k3y") and not bearer_ok("Bearer k3", "k3y") and not bearer_ok("Basic k3y", "k3y")


# -- the async engine loop ----------------------------------------------------------------------------------


PROMPTS = [[5, 7, 9, 11], [3, 1, 4, 1, 5, 9, 2, 6], [8, 8, 8], [12, 40, 7, 7, 3, 90, 11]]


def _params(i: int) -> SamplingParams:
    if i % 2:
        return SamplingParams(max_new_tokens=6 + i, temperature=0.8, top_k=20, seed=100 + i)
    return SamplingParams(max_new_tokens=6 + i)


@pytest.fixture(scope="module")
def engine(local_controller, tiny):  # noqa: F811
    eng = LLMEngine.load(local_controller, tiny, max_model_len=128, max_num_seqs=3, max_prefill_tokens=6,
                         stop_at_eos=False)
    yield eng
    eng.close()


def test_async_loop_serves_concurrent_requests_as_if_alone(engine):
    want = [engine.generate([p], _params(i))[0].token_ids for i, p in enumerate(PROMPTS * 3)]
    loop = AsyncLLMEngine(engine, max_waiting=64).start()
    try:
        async def main():
            return await asyncio.gather(*(loop.generate(p, _params(i)) for i, p in enumerate(PROMPTS * 3)))

        outs = asyncio.run(main())
    finally:
        loop.close()
    assert [list(o.token_ids) for o in outs] == want
    assert all(o.finish_reason == "length" for o in outs)
    assert engine.allocator.num_free == engine.allocator.num_blocks and not engine.requests


def test_async_loop_abort_frees_blocks_and_the_queue_is_bounded(engine):
    loop = AsyncLLMEngine(engine, max_waiting=3).start()
    try:
        async def main():
            long = loop.submit([Submission(p, SamplingParams(max_new_tokens=100)) for p in PROMPTS[:3]])
            await asyncio.gather(*(s.__anext__() for s in long))  # all three run (max_num_seqs=3)
            waiting = loop.submit([Submission(PROMPTS[3], SamplingParams(max_new_tokens=4))] * 3)
            with pytest.raises(QueueFull) as full:
                loop.submit([Submission(PROMPTS[0], SamplingParams(max_new_tokens=4))])
            assert full.value.retry_after_s == 1.0
            with pytest.raises(ValueError, match="outside the vocabulary"):  # refused at once, nothing queued
                loop.submit([Submission([10**6], SamplingParams())])
            for s in long:
                s.abort()
            ends = [[o async for o in s][-1] for s in long]
            assert {o.finish_reason for o in ends} == {"abort"}
            return [[o async for o in s][-1] for s in waiting]

        done = asyncio.run(main())
        assert [o.finish_reason for o in done] == ["length"] * 3
        assert engine.allocator.num_free == engine.allocator.num_blocks and not engine.scheduler.running
        assert loop.snapshot["requests_aborted"] == 3
    finally:
        loop.close()


class _FailOnce:
    """The real controller, except that one engine step raises (a rank error the engine does not recover)."""

    def __init__(self, ctl, fail_at: int) -> None:
        self.ctl, self.calls, self.fail_at = ctl, 0, fail_at

    def __getattr__(self, name):
        return getattr(self.ctl, name)

    def collective_rpc(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected rank failure")
        return self.ctl.collective_rpc(*args, **kwargs)


def test_a_failing_step_fails_its_requests_and_the_loop_serves_the_next(engine):
    real = engine.controller
    engine.controller = _FailOnce(real, fail_at=3)
    loop = AsyncLLMEngine(engine).start()
    try:
        async def main():
            first = await asyncio.gather(*(loop.generate(p, SamplingParams(max_new_tokens=5)) for p in PROMPTS[:2]))
            after = await loop.generate(PROMPTS[2], SamplingParams(max_new_tokens=5))
            return first, after

        first, after = asyncio.run(main())
    finally:
        loop.close()
        engine.controller = real
    assert [o.finish_reason for o in first] == ["error", "error"]
    assert "injected rank failure" in first[0].error
    assert after.finish_reason == "length" and len(after.token_ids) == 5
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_chat_on_a_checkpoint_without_template_is_a_400(engine, tiny, tmp_path):
    from tessera.launch.serve.llm import ApiError, LLMService
    from tessera.launch.serve.metrics import ServeMetrics

    loop = AsyncLLMEngine(engine).start()
    try:
        service = LLMService(loop, "tiny", ServeMetrics(lambda: loop.snapshot), ChatTemplate.load(tmp_path))
        body = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(ApiError) as err:
            asyncio.run(service.chat(body))
        assert err.value.status == 400 and "no chat template" in err.value.body["error"]["message"]
    finally:
        loop.close()


class _GatedImageEngine:
    """A DiffusionEngine stand-in for the image loop: records each call; the first one waits for a gate, so the
    requests sent meanwhile queue together. Exact batching is possible for mode "exact" only."""

    def __init__(self) -> None:
        import threading

        self.calls: list[tuple[list[str], bool]] = []
        self.gate = threading.Event()

    def supports_batch_invariance(self, mode: str) -> bool:
        return mode == "exact"

    def generate_images(self, prompts, *, batch_invariant, **_):
        from PIL import Image

        self.calls.append((list(prompts), batch_invariant))
        if len(self.calls) == 1:
            assert self.gate.wait(30)
        return [Image.new("RGB", (8, 8)) for _ in prompts]


@pytest.mark.parametrize("exact", [True, False])
def test_image_loop_batches_exactly_or_fast_and_runs_a_shared_state_mode_alone_when_exact(exact):
    from tessera.launch.serve.images import ImageJob, ImageService

    engine = _GatedImageEngine()
    service = ImageService(engine, exact_batches=exact).start()

    def job(prompt: str, mode: str) -> ImageJob:
        return ImageJob(prompt=prompt, n=1, width=32, height=32, steps=2, guidance_scale=4.0, seed=0, mode=mode,
                        negative_prompt="")

    async def main():
        first = asyncio.create_task(service.generate(job("busy", "exact")))
        for _ in range(300):  # bounded: the loop has taken the first request
            if engine.calls:
                break
            await asyncio.sleep(0.01)
        rest = [asyncio.create_task(service.generate(job(p, m)))
                for p, m in (("a", "exact"), ("b", "exact"), ("c", "displaced"), ("d", "displaced"))]
        await asyncio.sleep(0.2)  # all four queued behind the first
        engine.gate.set()
        return await asyncio.wait_for(asyncio.gather(first, *rest), 60)

    try:
        results = asyncio.run(main())
    finally:
        service.close()
    assert all(len(r) == 1 and r[0].startswith(b"\x89PNG") for r in results)
    want = [(["busy"], exact), (["a", "b"], exact)]
    want += [(["c"], True), (["d"], True)] if exact else [(["c", "d"], False)]
    assert engine.calls == want
