"""Pictures of a placement and of the affinity it exploits (PNG, matplotlib Agg).

* placement: a layers x experts grid coloured by the primary rank; experts
  are ordered by their layer-0 rank so that a chain kept on one rank shows
  as a column block of one colour and scattered placements look like noise.
  Replicas are marked with a dot.
* affinity: the conditional matrix P(q at l+1 | p at l) of the first layer
  pairs, rows and columns ordered by rank so that affinity captured by the
  placement sits in diagonal blocks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tessera.memory.expert_placement import ExpertPlacement
from tessera.memory.affinity.stats import AffinityStats


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - matplotlib is in the plot/test extras
        raise RuntimeError("plotting needs matplotlib: pip install 'tessera[plot]'") from err
    return plt


def plot_placement(placement: ExpertPlacement, path: str | os.PathLike, title: str = "") -> Path:
    plt = _pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap

    ranks = placement.num_ranks
    order = np.lexsort((np.arange(placement.num_experts), placement.rank_of[0]))
    grid = placement.rank_of[:, order]
    colors = plt.get_cmap("tab20" if ranks > 10 else "tab10")(np.arange(ranks) % 20)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * placement.num_experts + 2), max(2.5, 0.3 * placement.num_layers + 1.5)))
    im = ax.imshow(grid, cmap=ListedColormap(colors), norm=BoundaryNorm(np.arange(ranks + 1) - 0.5, ranks), aspect="auto", interpolation="nearest")
    for layer in range(placement.num_layers):
        for col, e in enumerate(order):
            if placement.replicas[layer][e]:
                ax.plot(col, layer, "k.", markersize=4)
    ax.set_xlabel("expert (ordered by layer-0 rank)")
    ax.set_ylabel("MoE layer")
    ax.set_title(title or f"placement: {placement.solver or '?'} ({ranks} ranks)")
    fig.colorbar(im, ax=ax, ticks=range(ranks), label="rank")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_affinity(stats: AffinityStats, path: str | os.PathLike, placement: ExpertPlacement | None = None, max_pairs: int = 4) -> Path:
    plt = _pyplot()
    pairs = min(max_pairs, stats.num_layers - 1)
    if pairs < 1:
        raise ValueError("an affinity plot needs at least 2 MoE layers")
    cond = stats.conditional()
    fig, axes = plt.subplots(1, pairs, figsize=(3.2 * pairs + 1.2, 3.6), squeeze=False, layout="constrained")
    for i in range(pairs):
        ax = axes[0, i]
        m = cond[i]
        if placement is not None:
            rows = np.argsort(placement.rank_of[i], kind="stable")
            cols = np.argsort(placement.rank_of[i + 1], kind="stable")
            m = m[rows][:, cols]
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=max(float(cond.max()), 1e-9), interpolation="nearest")
        ax.set_title(f"P(layer {i + 1} | layer {i})", fontsize=9)
        ax.set_xlabel("expert at l+1" + (" (by rank)" if placement is not None else ""), fontsize=8)
        if i == 0:
            ax.set_ylabel("expert at l" + (" (by rank)" if placement is not None else ""), fontsize=8)
        if placement is not None:
            share = stats.num_experts // placement.num_ranks
            for b in range(1, placement.num_ranks):
                ax.axhline(b * share - 0.5, color="w", lw=0.6)
                ax.axvline(b * share - 0.5, color="w", lw=0.6)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    fig.suptitle(f"expert affinity (strength {stats.affinity_strength():.2f})", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
