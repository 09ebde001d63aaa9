"""Small real models and checkpoints for the offload tests (no mocks of the I/O).

``TinyMoE`` is a miniature sparse MoE language model whose dense layer
weights and expert weights are fetched per layer through the same two seams
the runtime uses: a dense-layer source (``use(name)`` context) and an expert
source (``get(layer, ids, hidden)``). The in-memory sources below are the
"no offload" reference; the offload tests swap in LayerStreamer/ExpertCache.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tessera.offload.store import GroupSpec, group_spec


class TinyMoE:
    """Embedding -> L x (dense mixing + top-k MoE) -> head, all weights as named groups."""

    def __init__(self, vocab=97, hidden=64, inter=128, layers=4, experts=8, top_k=2, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape, scale=0.2):
            return (torch.randn(*shape, generator=g) * scale).to(dtype)

        self.layers, self.experts, self.top_k, self.hidden = layers, experts, top_k, hidden
        self.embed = rnd(vocab, hidden, scale=1.0)
        self.head = rnd(vocab, hidden)
        self.dense = {
            f"layers.{i}.dense": {"mix": rnd(hidden, hidden), "gate": rnd(experts, hidden, scale=1.0), "norm": 1 + rnd(hidden, scale=0.1)}
            for i in range(layers)
        }
        self.expert = {
            (i, e): {"w1": rnd(inter, hidden), "w2": rnd(hidden, inter)} for i in range(layers) for e in range(experts)
        }

    # weight groups ----------------------------------------------------------------------

    def dense_specs(self) -> list[GroupSpec]:
        return [group_spec(n, t) for n, t in self.dense.items()]

    def expert_specs(self) -> list[GroupSpec]:
        return [group_spec(f"layers.{l}.experts.{e}", t) for (l, e), t in self.expert.items()]

    def gate_weight(self, layer: int):
        return self.dense[f"layers.{layer}.dense"]["gate"] if 0 <= layer < self.layers else None

    # compute ------------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor, dense_src, expert_src, trace: list | None = None) -> torch.Tensor:
        h = self.embed[ids]
        for i in range(self.layers):
            with dense_src.use(f"layers.{i}.dense") as dh:
                w = dh.tensors
                x = F.rms_norm(h, (self.hidden,), w["norm"])
                h = h + torch.tanh(x @ w["mix"].t())
                x = F.rms_norm(h, (self.hidden,), w["norm"])
                logits = x @ w["gate"].t()
            probs, sel = torch.softmax(logits, -1).topk(self.top_k, dim=-1)
            probs = probs / probs.sum(-1, keepdim=True)
            used = sorted(set(sel.reshape(-1).tolist()))
            if trace is not None:
                trace.append((i, used))
            weights = expert_src.get(i, used, hidden=x)
            out = torch.zeros_like(h)
            for e in used:
                tok, slot = (sel == e).nonzero(as_tuple=True)
                ew = weights[e]
                y = F.silu(x[tok] @ ew["w1"].t()) @ ew["w2"].t()
                out.index_add_(0, tok, y * probs[tok, slot].unsqueeze(-1))
            h = h + out
        return h @ self.head.t()

    def generate(self, prompt: list[int], steps: int, dense_src, expert_src, trace=None):
        """Greedy decode (no KV cache: the whole sequence each step); returns tokens and last logits."""
        ids = list(prompt)
        all_logits = []
        for _ in range(steps):
            logits = self.forward(torch.tensor(ids), dense_src, expert_src, trace)
            all_logits.append(logits[-1])
            ids.append(int(logits[-1].argmax()))
        return ids[len(prompt):], torch.stack(all_logits)


class InMemoryDense:
    """The no-offload reference for dense layers."""

    def __init__(self, model: TinyMoE):
        self.model = model

    @contextmanager
    def use(self, name):
        yield SimpleNamespace(tensors=self.model.dense[name])


class InMemoryExperts:
    """The no-offload reference for experts."""

    def __init__(self, model: TinyMoE):
        self.model = model

    def get(self, layer, ids, hidden=None):
        return {e: self.model.expert[(layer, e)] for e in ids}


def total_bytes(specs) -> int:
    return sum(s.nbytes for s in specs)


import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def aio_ready() -> str | None:
    """None when DeepSpeed's aio op is usable in this session, else why not (the skip reason).

    It is used when already built (prebuilt wheel or the torch extensions
    cache). Compiling it costs ~5 minutes on 2 cores, so the suite compiles
    it only when TESSERA_BUILD_AIO=1 asks for it (once per session, here).
    The preadv fallback is tested in every run regardless.
    """
    from tessera.offload.aio import aio_built, load_aio

    build = os.environ.get("TESSERA_BUILD_AIO") == "1"
    if not aio_built() and not build:
        # `make test` pre-builds it once per environment and records why when it could not
        stamp = Path(sys.prefix) / ".tessera-aio"
        why = f" (make test's set-up: {stamp.read_text().strip()})" if stamp.is_file() else ""
        return ("DeepSpeed aio op not pre-built on this machine; CI does not compile it (~5 min): "
                f"pre-build it as in the README, or set TESSERA_BUILD_AIO=1{why}")
    try:
        load_aio(allow_build=build)
        return None
    except Exception as exc:  # noqa: BLE001 - e.g. a cache built for another environment
        return f"DeepSpeed aio op is in the cache but does not load here ({str(exc)[:160]}); rebuild it (README)"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny ops with 2 OpenMP threads on a loaded 2-core machine spin for ~100 ms each: use one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
