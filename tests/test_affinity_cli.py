"""``tessera place``: trace in, placement file (and PNGs) out."""

from __future__ import annotations

import numpy as np

from tessera.launch.cli import main
from tessera.memory.affinity.metrics import cross_rank_fraction
from tessera.memory.affinity.placement_file import load_placement
from tessera.memory.affinity.stats import AffinityStats
from tessera.memory.affinity.synthetic import planted_affinity_trace


def test_place_writes_placement_and_plots(tmp_path, capsys):
    syn = planted_affinity_trace(num_layers=3, num_experts=8, num_groups=2, top_k=2, num_tokens=800, affinity=0.9, seed=31)
    trace_path = syn.trace.save(tmp_path / "trace.npz")
    out = tmp_path / "placement.json"
    code = main(["place", str(trace_path), "--ranks", "2", "--solver", "ilp", "--time-limit", "3",
                 "--replicas", "1", "--ranks-per-node", "1", "--out", str(out), "--plot", str(tmp_path / "plots")])
    assert code == 0
    placement, meta = load_placement(out)
    assert placement.num_ranks == 2 and placement.has_replicas
    stats = AffinityStats.from_trace(syn.trace)
    assert cross_rank_fraction(stats, placement) <= cross_rank_fraction(stats, syn.planted_rank_of, 2) + 0.01
    for name in ("placement.png", "affinity.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    printed = capsys.readouterr().out
    assert "cross_rank_fraction" in printed and "balancedness_mean" in printed


def test_place_reports_bad_input_in_one_line(tmp_path, capsys):
    syn = planted_affinity_trace(num_layers=2, num_experts=8, num_groups=2, num_tokens=50, seed=32)
    trace_path = syn.trace.save(tmp_path / "trace.npz")
    assert main(["place", str(trace_path), "--ranks", "3", "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be shared equally by 3 ranks" in err[0]
    assert main(["place", str(tmp_path / "missing.npz"), "--ranks", "2"]) == 2
    assert not np.any([p.name == "p.json" for p in tmp_path.iterdir()])
