"""Failures stay local in the MoE engine (issue 12): a bad request fails alone, the engine keeps serving.

In-process (one rank): every bad input is refused with its message while a good
request in the same call completes as it would alone; sampling never turns an
accepted temperature into NaN; a request whose logits are not finite fails
alone; a bounded property-based fuzz of sampling parameters and request shapes
never hangs or breaks the engine. Faults on real Ray workers (a request that
kills a worker, a stalled rank, a spent restart budget) are in
``tests/test_llm_chaos.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tessera.models.tiny_moe import build_tiny_moe
from tessera.runtime.llm.engine import LLMEngine, SamplingParams
from tessera.tests.llm_testing import local_controller  # noqa: F401 - fixture

GOOD = [5, 7, 9, 11]
OPTS = dict(dtype="float32", stop_at_eos=False, max_model_len=32, block_size=4, max_num_seqs=4, decode_steps=4)


@pytest.fixture(scope="module")
def tiny(session_tmp):
    return build_tiny_moe("mixtral", session_tmp / "faults-mixtral")


@pytest.fixture(scope="module")
def engine(local_controller, tiny):  # noqa: F811
    eng = LLMEngine.load(local_controller, tiny, **OPTS)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def alone(engine):
    return engine.generate(GOOD, SamplingParams(max_new_tokens=6))[0].token_ids


VOCAB = 128  # build_tiny_moe's default vocabulary

BAD_REQUESTS = [
    ("none-prompt", None, {}, "prompt must be a string or a sequence of integer token ids"),
    ("none-in-prompt", [1, None, 3], {}, "prompt must be a string or a sequence of integer token ids"),
    ("bool-in-prompt", [True, 2], {}, "prompt must be a string or a sequence of integer token ids"),
    ("float-in-prompt", [1.5, 2], {}, "prompt must be a string or a sequence of integer token ids"),
    ("empty-prompt", [], {}, "prompt is empty"),
    ("negative-id", [-1, 2], {}, r"prompt token id -1 is outside the vocabulary \[0, 128\)"),
    ("id-past-vocab", [VOCAB], {}, r"prompt token id 128 is outside the vocabulary"),
    ("text-without-tokenizer", "hello", {}, "has no tokenizer.json; pass token ids instead"),
    ("prompt-fills-context", list(range(1, 33)), {}, "leaving no room to generate"),
    ("zero-new-tokens", GOOD, {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ("nan-temperature", GOOD, {"temperature": math.nan}, "temperature must be a finite number >= 0"),
    ("inf-temperature", GOOD, {"temperature": math.inf}, "temperature must be a finite number >= 0"),
    ("negative-temperature", GOOD, {"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ("string-temperature", GOOD, {"temperature": "hot"}, "temperature must be a finite number >= 0"),
    ("zero-top-p", GOOD, {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ("big-top-p", GOOD, {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ("negative-top-k", GOOD, {"top_k": -1}, "top_k must be an integer >= 0"),
    ("negative-seed", GOOD, {"seed": -3}, "seed must be None or an integer >= 0"),
    ("stop-past-vocab", GOOD, {"stop_token_ids": [VOCAB + 5]}, "stop token id 133 is outside the vocabulary"),
    ("unknown-key", GOOD, {"max_tokens": 3}, r"unknown sampling option 'max_tokens' \(did you mean 'max_new_tokens'\?\)"),
]


@pytest.mark.parametrize("name, prompt, sampling, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_a_bad_request_fails_alone_and_the_engine_serves_on(engine, alone, name, prompt, sampling, message):
    bad, good = engine.generate([prompt, GOOD], [sampling, SamplingParams(max_new_tokens=6)])
    assert bad.finish_reason == "error" and bad.token_ids == []
    assert bad.error is not None
    import re

    assert re.search(message, bad.error), f"{name}: {bad.error!r} does not say {message!r}"
    assert good.finish_reason == "length" and good.token_ids == alone  # the good request of the same call
    assert engine.generate(GOOD, SamplingParams(max_new_tokens=6))[0].token_ids == alone  # and the next call
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["running"] == stats["waiting"] == 0


def test_sampling_parameters_object_of_the_wrong_type_fails_alone(engine, alone):
    bad, good = engine.generate([GOOD, GOOD], ["greedy", None])
    assert bad.finish_reason == "error" and "sampling must be SamplingParams or a dict" in bad.error
    assert good.token_ids[:6] == alone[:6]


def test_a_tiny_temperature_is_greedy_not_nan(engine, alone):
    """temperature=1e-45 passes validation; logits / 1e-45 overflowed to inf and NaN before."""
    for temperature in (1e-45, 1e-30, 5e-324):
        result = engine.generate(GOOD, SamplingParams(max_new_tokens=6, temperature=temperature, seed=3))[0]
        assert result.finish_reason == "length" and result.token_ids == alone


def test_a_huge_temperature_still_samples_valid_tokens(engine):
    result = engine.generate(GOOD, SamplingParams(max_new_tokens=6, temperature=1e300, seed=3))[0]
    assert result.finish_reason == "length" and all(0 <= t < VOCAB for t in result.token_ids)


def test_a_request_with_non_finite_logits_fails_alone(local_controller, tiny, tmp_path):  # noqa: F811
    """A token whose embedding is NaN poisons only the sequences that contain it."""
    import shutil

    broken = tmp_path / "nan-row"
    shutil.copytree(tiny, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.embed_tokens.weight"][3] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    eng = LLMEngine.load(local_controller, broken, **OPTS)
    try:
        alone = eng.generate(GOOD, SamplingParams(max_new_tokens=6))[0].token_ids
        bad, good = eng.generate([[3, 4, 5], GOOD], SamplingParams(max_new_tokens=6))
        assert bad.finish_reason == "error" and "not finite (NaN or inf)" in bad.error
        assert good.finish_reason == "length" and good.token_ids == alone
        assert eng.stats()["kv_blocks_free"] == eng.stats()["kv_blocks_total"]
    finally:
        eng.close()


def test_all_nan_weights_fail_every_request_with_the_reason_not_zeros(local_controller, tiny, tmp_path):  # noqa: F811
    import shutil

    broken = tmp_path / "all-nan"
    shutil.copytree(tiny, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["lm_head.weight"] = torch.full_like(weights["lm_head.weight"], float("nan"))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    eng = LLMEngine.load(local_controller, broken, **OPTS)
    try:
        results = eng.generate([GOOD, [1, 2]], SamplingParams(max_new_tokens=3))
        assert [r.finish_reason for r in results] == ["error", "error"]
        assert all("not finite" in r.error and r.token_ids == [] for r in results)
    finally:
        eng.close()


# -- a bounded fuzz: no input hangs or breaks the engine -----------------------------------------------------

_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**9), st.none(),
                     st.text(max_size=3), st.booleans())
_sampling = st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.one_of(st.integers(-2, 40), _numbers),
    "temperature": st.one_of(st.floats(0, 1e308), st.floats(min_value=1e-320, max_value=1e-3), _numbers),
    "top_k": st.one_of(st.integers(-2, 300), _numbers),
    "top_p": st.one_of(st.floats(0, 1.2), _numbers),
    "seed": st.one_of(st.integers(-2, 2**40), _numbers),
    "stop_token_ids": st.one_of(st.lists(st.integers(-3, 140), max_size=3), _numbers),
})
_prompt = st.one_of(st.lists(st.integers(-3, 140), max_size=40), st.lists(_numbers, max_size=4), st.none(),
                    st.text(max_size=5))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(requests=st.lists(st.tuples(_prompt, _sampling), min_size=1, max_size=4))
def test_fuzzed_requests_never_hang_or_break_the_engine(engine, alone, requests):
    results = engine.generate([p for p, _ in requests], [s for _, s in requests])
    assert len(results) == len(requests)
    for result in results:
        assert result.finish_reason in ("length", "stop", "error")
        if result.finish_reason == "error":
            assert result.error
        else:
            assert all(isinstance(t, int) and 0 <= t < VOCAB for t in result.token_ids)
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["running"] == stats["waiting"] == 0
    assert engine.generate(GOOD, SamplingParams(max_new_tokens=6))[0].token_ids == alone
