"""``/v1/images/generations`` on Ray Serve with the ``openai`` client: PNGs equal to the Python API's images.

One tiny PixArt server (plan sp=2) for the module. Concurrent requests that can share a denoising loop run as
one batch; four concurrent clients each get, bit for bit, the image that the same request makes alone through
``tessera.launch(...).generate_images`` (exact batching, the default: one forward per image inside the shared
loop); a request of ``n`` images equals the same images made through the API with ``batch_invariant``.
"""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest

import tessera
from tessera.models.tiny_diffusion import build_tiny_diffusion
from tessera.tests.serve_testing import free_port

NAME = "tiny-pixart"


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    return str(build_tiny_diffusion("pixart", tmp_path_factory.mktemp("serve-images") / "pixart"))


@pytest.fixture(scope="module")
def server(ray_session, pixart):
    handle = tessera.serve(pixart, plan={"sp": 2}, port=free_port(), served_model_name=NAME,
                           engine_options={"progress": False})
    try:
        yield handle
    finally:
        handle.shutdown()


@pytest.fixture(scope="module")
def reference(ray_session, pixart):
    with tessera.launch(pixart, plan={"sp": 2}, engine_options={"progress": False}) as handle:
        yield handle


def pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_four_concurrent_image_requests_are_batched_and_equal_the_images_made_alone(server, reference):
    from openai import AsyncOpenAI

    prompts = ["a red square", "a blue ball", "a green tree", "a cat"]

    async def one(c, i):
        r = await c.images.generate(model=NAME, prompt=prompts[i], n=1, size="32x32", response_format="b64_json",
                                    extra_body={"steps": 2, "seed": 10 + i, "guidance_scale": 4.0})
        return r.data[0].b64_json

    async def main():
        c = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        try:
            # A long request of another size occupies the engine while the four arrive: they wait together.
            busy = asyncio.create_task(c.images.generate(model=NAME, prompt="busy", n=1, size="128x128",
                                                         response_format="b64_json", extra_body={"steps": 60}))
            for _ in range(600):  # bounded: the busy request has started (the engine is in its loop)
                if (await asyncio.to_thread(server.stats))["running"]:
                    break
                await asyncio.sleep(0.05)
            got = await asyncio.gather(*(one(c, i) for i in range(4)))
            await busy
            return got
        finally:
            await c.close()

    before = server.stats()
    got = asyncio.run(main())
    after = server.stats()
    for i, b64 in enumerate(got):
        (want,) = reference.generate_images([prompts[i]], steps=2, height=32, width=32, seed=10 + i, guidance_scale=4.0)
        # Batched with three others, made alone here: the same PNG pixels (exact batching).
        assert np.array_equal(pixels(b64), np.asarray(want.convert("RGB"))), f"request {i} differs from alone"
    assert after["requests_finished"] - before["requests_finished"] == 5
    assert after["batches"] - before["batches"] == 2  # the busy request, then the four in one denoising loop


def test_n_images_size_and_errors(server, reference):
    from openai import OpenAI

    c = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = c.images.generate(model=NAME, prompt="a red square", n=2, size="64x32", extra_body={"steps": 2, "seed": 3})
    # Fields a request leaves out take the job's `images:` values (here ImageOptions' defaults: guidance 4.0).
    # Image i of a request is drawn from seed + i (so it does not depend on the requests it is batched with).
    want = reference.generate_images(["a red square"] * 2, steps=2, height=32, width=64, seed=[3, 4],
                                     guidance_scale=4.0, batch_invariant=True)
    assert [pixels(d.b64_json).shape for d in r.data] == [(32, 64, 3)] * 2
    assert all(np.array_equal(pixels(d.b64_json), np.asarray(w.convert("RGB"))) for d, w in zip(r.data, want))
    with httpx.Client(timeout=60) as http:
        bad = http.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "size": "30x30", "steps": 1})
        assert bad.status_code == 400 and "multiples of" in bad.json()["error"]["message"]
        bad = http.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "response_format": "url"})
        assert bad.status_code == 400 and "response_format" in bad.json()["error"]["message"]
        bad = http.post(f"{server.url}/v1/completions", json={"model": NAME, "prompt": "x"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "wrong_endpoint"
        assert http.get(f"{server.url}/health").json() == {"status": "ready"}
        metrics = http.get(f"{server.url}/metrics").text
    assert "tessera_images_total" in metrics and "\ntessera_images_per_second" in metrics
    assert 'tessera_requests_total{endpoint="images",status="400"}' in metrics
