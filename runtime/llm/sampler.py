"""Token sampling: greedy, temperature, top-k, top-p, with a per-request seed.

Randomness is a pure function of (request seed, index of the generated token),
so a request samples the same tokens whatever else shares its batch, across
replays and on whichever rank samples.

Numerically safe for every input the engine accepts: logits are shifted by
their maximum before the temperature divides them, in float64 (any finite
temperature > 0 then gives the best token 0 and the others <= 0, possibly -inf),
and a row that is not finite (a model producing NaN/inf) is reported as that
request's error instead of a token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NOT_FINITE = -1  # the "token" of a row whose logits were not finite (the engine fails that request alone)


@dataclass(frozen=True)
class SampleSpec:
    temperature: float
    top_k: int
    top_p: float
    seed: int
    index: int  # how many tokens the request generated before this one


def sample(logits: torch.Tensor, specs: list[SampleSpec | None]) -> list[int]:
    """One token per row of ``logits`` [B, V]; :data:`NOT_FINITE` for a row with NaN/inf; None specs: no token."""
    out = []
    rows = logits.float()
    finite = torch.isfinite(rows).all(dim=-1).tolist()
    for row, spec, ok in zip(rows, specs, finite):
        if spec is None:
            out.append(None)
            continue
        if not ok:
            out.append(NOT_FINITE)
            continue
        if spec.temperature == 0.0:
            out.append(int(row.argmax()))
            continue
        # In float64 (any Python temperature > 0 is a non-zero double): the maximum becomes 0 and the others
        # <= 0 (or -inf), so exp never overflows and a tiny temperature is greedy, never NaN.
        row = (row.double() - row.max()) / spec.temperature
        if 0 < spec.top_k < row.shape[0]:
            kth = row.topk(spec.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if spec.top_p < 1.0:
            sorted_row, order = row.sort(descending=True)
            probs = sorted_row.softmax(-1)
            drop = probs.cumsum(-1) - probs >= spec.top_p  # keep the smallest prefix reaching top_p
            row = row.scatter(0, order, sorted_row.masked_fill(drop, float("-inf")))
        gen = torch.Generator().manual_seed((spec.seed * 1_000_003 + spec.index) % (2**63))
        out.append(int(torch.multinomial(row.softmax(-1), 1, generator=gen)))
    return out
