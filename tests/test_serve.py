"""The OpenAI-compatible server on Ray Serve, end to end, with real clients (the ``openai`` package and httpx).

One server for the module (a tiny Qwen3-MoE with a tokenizer and a chat template, plan ep=2, API key on),
started on loopback in the test session's Ray. Every generated answer is compared with the same request run
alone through the Python API (``tessera.launch(...).generate`` on the same plan and engine options): token ids
(the ``return_token_ids`` extension) and text.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

import tessera
from tessera.models.tiny_moe import build_tiny_moe
from tessera.options import SamplingParams
from tessera.tests.serve_testing import free_port, prompt, wait_until

KEY = "test-key-0123456789"
NAME = "tiny-qwen3"
OPTIONS = {"max_model_len": 4096, "max_num_seqs": 8, "max_prefill_tokens": 48, "decode_steps": 4, "stop_at_eos": False}
MAX_WAITING = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_moe("qwen3_moe", tmp_path_factory.mktemp("serve") / "qwen3", tokenizer=True, max_positions=4096)


@pytest.fixture(scope="module")
def server(ray_session, model_dir):
    handle = tessera.serve(str(model_dir), plan={"ep": 2}, port=free_port(), api_key=KEY, served_model_name=NAME,
                           max_waiting=MAX_WAITING, engine_options=OPTIONS)
    try:
        yield handle
    finally:
        handle.shutdown()


@pytest.fixture(scope="module")
def reference(ray_session, model_dir):
    """The Python API on the same plan and options: each request is run alone."""
    with tessera.launch(str(model_dir), plan={"ep": 2}, engine_options=OPTIONS) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def alone(reference, prompt_ids_or_text, **sampling):
    (res,) = reference.generate([prompt_ids_or_text], SamplingParams(**sampling))
    return res


def test_models_and_a_completion_equal_the_python_api(server, client, reference):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME] and models.data[0].max_model_len == 4096
    r = client.completions.create(model=NAME, prompt=prompt(1), max_tokens=12, temperature=0,
                                  extra_body={"return_token_ids": True})
    want = alone(reference, prompt(1), max_new_tokens=12)
    assert r.choices[0].token_ids == want.token_ids and r.choices[0].text == want.text
    assert r.choices[0].finish_reason == {"length": "length", "stop": "stop"}[want.finish_reason]
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids) and r.usage.total_tokens == r.usage.prompt_tokens + len(want.token_ids)
    assert r.model == NAME and r.object == "text_completion"


def _sampling(i: int) -> dict:
    if i % 2:  # seeded sampling; temperature, top_k (extension) and seed as a client sends them
        return {"temperature": 0.8, "top_k": 20, "seed": 1000 + i}
    return {"temperature": 0.0}


def test_32_concurrent_streaming_clients_equal_requests_run_alone(server, reference):
    from openai import AsyncOpenAI

    async def one(c, i):
        s = _sampling(i)
        stream = await c.completions.create(
            model=NAME, prompt=prompt(i), max_tokens=8 + i % 17, stream=True, temperature=s["temperature"],
            seed=s.get("seed"), extra_body={"return_token_ids": True, "top_k": s.get("top_k", 0)})
        text, ids, reason = [], [], None
        async for chunk in stream:
            for ch in chunk.choices:
                text.append(ch.text)
                ids.extend(ch.token_ids)
                reason = ch.finish_reason or reason
        return "".join(text), ids, reason

    async def main():
        c = AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(c, i) for i in range(32)))
        finally:
            await c.close()

    got = asyncio.run(main())
    for i, (text, ids, reason) in enumerate(got):
        s = _sampling(i)
        want = alone(reference, prompt(i), max_new_tokens=8 + i % 17, temperature=s["temperature"],
                     top_k=s.get("top_k", 0), seed=s.get("seed"))
        assert ids == want.token_ids, f"client {i} ({'seeded' if i % 2 else 'greedy'})"
        assert text == want.text and reason == want.finish_reason
    stats = server.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["running"] == 0


def test_chat_n2_streaming_and_template(server, client, reference, model_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "the router sends"}, {"role": "user", "content": "a tessera is one tile"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, n=2, temperature=0.9, seed=7,
                                       extra_body={"return_token_ids": True})
    ids = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(messages, add_generation_prompt=True,
                                                                       tokenize=True, return_dict=False)
    assert r.prompt_token_ids == list(ids)  # the checkpoint's template, as transformers renders and tokenizes it
    for i, choice in enumerate(r.choices):
        want = alone(reference, list(ids), max_new_tokens=10, temperature=0.9, seed=7 + i, stop_token_ids=(2,))
        assert choice.index == i and choice.token_ids == want.token_ids and choice.message.content == want.text
        assert choice.message.role == "assistant"
    assert r.choices[0].token_ids != r.choices[1].token_ids  # n choices draw with seeds seed, seed + 1
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in r.choices)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True,
                                            n=2, stream_options={"include_usage": True})
    parts: dict[int, list[str]] = {0: [], 1: []}
    reasons, usage, roles = {}, None, set()
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            roles.add(ch.delta.role)
            parts[ch.index].append(ch.delta.content or "")
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    greedy = alone(reference, list(ids), max_new_tokens=10, stop_token_ids=(2,))
    assert "".join(parts[0]) == "".join(parts[1]) == greedy.text and set(reasons) == {0, 1}
    assert "assistant" in roles and usage.completion_tokens == 2 * len(greedy.token_ids)


def test_stop_strings_and_stop_ids(server, client, reference):
    p = prompt(4)
    want = alone(reference, p, max_new_tokens=24)
    text, ids = want.text, want.token_ids
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    r = client.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    k = 5  # a stop token id ends the request with that token (ids in `stop`, or the stop_token_ids extension)
    r = client.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0, extra_body={
        "stop": [ids[k]], "return_token_ids": True})
    assert r.choices[0].token_ids == ids[: ids.index(ids[k]) + 1] and r.choices[0].finish_reason == "stop"


def _error(resp: httpx.Response, status: int, code_or_type: str, text: str = "") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert code_or_type in (err["code"], err["type"]) and text in err["message"], err
    return err


def test_errors_have_openai_bodies(server):
    url, auth = server.url, {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "prompt": "the quick", "max_tokens": 4}
    with httpx.Client(timeout=60) as http:
        _error(http.post(f"{url}/v1/completions", json=body), 401, "invalid_api_key")
        _error(http.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401,
               "authentication_error")
        _error(http.get(f"{url}/v1/models"), 401, "invalid_api_key")
        _error(http.get(f"{url}/metrics"), 401, "invalid_api_key")
        post = lambda path, **kw: http.post(f"{url}{path}", json={**body, **kw}, headers=auth)  # noqa: E731
        _error(post("/v1/completions", model="gpt-4"), 404, "model_not_found", "'gpt-4'")
        err = _error(post("/v1/completions", temperature="hot"), 400, "invalid_request_error", "temperature")
        assert err["param"] == "temperature"
        _error(post("/v1/completions", best_of_n=2), 400, "invalid_request_error", "best_of_n")
        _error(post("/v1/completions", max_tokens=0), 400, "invalid_request_error", "max_tokens")
        _error(post("/v1/completions", prompt=[5, 10**6]), 400, "invalid_request_error", "outside the vocabulary")
        _error(post("/v1/completions", prompt=[5] * 4100), 400, "context_length_exceeded", "4100")
        _error(post("/v1/completions", prompt="x", max_tokens=5000), 400, "context_length_exceeded")
        _error(post("/v1/completions", logprobs=3), 400, "invalid_request_error", "logprobs")
        _error(http.post(f"{url}/v1/completions", content=b"{not json", headers={**auth, "Content-Type": "application/json"}),
               400, "invalid_request_error")
        chat = {"model": NAME, "messages": [{"role": "tool", "content": "x"}]}
        _error(http.post(f"{url}/v1/chat/completions", json=chat, headers=auth), 400, "invalid_request_error",
               "knows no role tool")
        _error(http.post(f"{url}/v1/images/generations", json={"prompt": "x"}, headers=auth), 400, "wrong_endpoint")
        ok = http.post(f"{url}/v1/completions", json=body, headers=auth)  # the server still serves
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_full_queue_answers_429_and_disconnects_free_kv_blocks(server):
    """8 long streams fill the batch (max_num_seqs=8), 32 more fill the waiting queue, the next gets 429;
    then every client disconnects and the engine frees every KV block (engine stats and /metrics)."""
    url, auth = server.url, {"Authorization": f"Bearer {KEY}"}
    total = server.stats()["kv_blocks_total"]

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
            async def open_stream(i):
                req = http.build_request("POST", f"{url}/v1/completions", headers=auth, json={
                    "model": NAME, "prompt": prompt(i), "max_tokens": 4000, "temperature": 0, "stream": True,
                    "stop": ["never-stops-here"]})
                resp = await http.send(req, stream=True)
                assert resp.status_code == 200
                return resp

            running = [await open_stream(i) for i in range(8)]
            readers = [resp.aiter_lines() for resp in running]  # kept: a collected reader closes its response
            for lines in readers:  # each request is decoding: its first data line arrived
                while not (await lines.__anext__()).startswith("data:"):
                    pass
            waiting = list(await asyncio.gather(*(open_stream(i) for i in range(8, 8 + MAX_WAITING))))
            stats = await asyncio.to_thread(wait_until, lambda: (s := server.stats())["waiting"] == MAX_WAITING and s,
                                            60, "the waiting queue to fill")
            assert stats["running"] == 8 and stats["kv_blocks_free"] < total
            full = await http.post(f"{url}/v1/completions", headers=auth,
                                   json={"model": NAME, "prompt": "x", "max_tokens": 4})
            assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
            assert full.json()["error"]["code"] == "queue_full"
            for resp in running + waiting:  # the clients go away
                await resp.aclose()

    aborted_before = server.stats()["requests_aborted"]
    asyncio.run(main())
    stats = wait_until(lambda: (s := server.stats())["running"] == 0 and s["waiting"] == 0
                       and s["kv_blocks_free"] == total and s, 60, "every KV block to be freed after the disconnects")
    assert stats["requests_aborted"] - aborted_before == 8 + MAX_WAITING
    metrics = httpx.get(f"{url}/metrics", headers=auth).text
    assert f"tessera_kv_blocks_free {float(total)}" in metrics and "tessera_kv_blocks_used 0.0" in metrics
    assert 'tessera_requests_total{endpoint="completions",status="429"}' in metrics
    assert 'tessera_requests_total{endpoint="completions",status="499"}' in metrics  # the disconnected streams


def test_health_and_metrics(server, client):
    client.completions.create(model=NAME, prompt="the router", max_tokens=6, temperature=0)
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ready"}
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for series in ("tessera_requests_total", "tessera_time_to_first_token_seconds_bucket",
                   "tessera_inter_token_latency_seconds_bucket", "tessera_e2e_request_latency_seconds_bucket",
                   "tessera_queue_length", "tessera_running_requests", "tessera_kv_blocks_used",
                   "tessera_kv_blocks_free", "tessera_generation_tokens_per_second", "tessera_recoveries_total",
                   "tessera_generation_tokens_total", "tessera_prompt_tokens_total", "tessera_engine_recovering"):
        assert f"\n{series}" in text, series
    assert 'tessera_requests_total{endpoint="completions",status="200"}' in text
