"""Placement files: the JSON that ``tessera place`` writes and the engine reads.

JSON rather than binary: a placement is small (layers x experts integers),
and people read and diff it. ``expert_map[l][e]`` is the primary rank,
``replicas[l][e]`` the extra ranks; ``layer_ids`` ties MoE layer ``l`` to the
model's own layer index, and ``model`` / ``num_experts`` let the engine
refuse a placement made for another model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tessera.memory.expert_placement import ExpertPlacement, PlacementInvalid

PLACEMENT_FORMAT = "tessera-expert-placement"
PLACEMENT_VERSION = 1


def save_placement(
    path: str | os.PathLike,
    placement: ExpertPlacement,
    model: str = "",
    layer_ids: tuple[int, ...] | None = None,
    extra: dict | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": PLACEMENT_FORMAT,
        "version": PLACEMENT_VERSION,
        "model": model,
        "solver": placement.solver,
        "num_layers": placement.num_layers,
        "num_experts": placement.num_experts,
        "num_ranks": placement.num_ranks,
        "layer_ids": list(layer_ids) if layer_ids is not None else list(range(placement.num_layers)),
        "expert_map": placement.expert_map(),
        "replicas": [[list(extra_ranks) for extra_ranks in row] for row in placement.replicas],
        "info": _jsonable(placement.info),
        **({"extra": _jsonable(extra)} if extra else {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def load_placement(path: str | os.PathLike) -> tuple[ExpertPlacement, dict]:
    """Return the placement and the file's metadata (model, layer_ids, ...); validates balance."""
    path = Path(path)
    if not path.is_file():
        raise PlacementInvalid(f"no placement file at {path}; write one with `tessera place TRACE --out {path}`")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PlacementInvalid(f"{path} is not JSON: {err}") from err
    if doc.get("format") != PLACEMENT_FORMAT:
        raise PlacementInvalid(f"{path} has format {doc.get('format')!r}, expected {PLACEMENT_FORMAT!r}")
    if int(doc.get("version", 0)) > PLACEMENT_VERSION:
        raise PlacementInvalid(f"{path} is placement format v{doc['version']}; this tessera reads up to v{PLACEMENT_VERSION}")
    rank_of = np.asarray(doc["expert_map"], dtype=np.int64)
    if rank_of.shape != (doc["num_layers"], doc["num_experts"]):
        raise PlacementInvalid(
            f"{path}: expert_map is {rank_of.shape}, header says ({doc['num_layers']}, {doc['num_experts']})"
        )
    replicas = tuple(tuple(tuple(r) for r in row) for row in doc.get("replicas") or ())
    placement = ExpertPlacement(rank_of, int(doc["num_ranks"]), doc.get("solver", ""), replicas, doc.get("info") or {},
                                layer_ids=doc.get("layer_ids"))
    meta = {k: doc[k] for k in ("model", "layer_ids", "num_ranks") if k in doc}
    meta["extra"] = doc.get("extra", {})
    return placement, meta


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def placement_for_model(path: str | os.PathLike, num_experts: int | None = None, moe_layers=None,
                        ep: int | None = None) -> ExpertPlacement:
    """The placement in a ``tessera place`` file, checked against the model (and the plan's ep degree).

    ``num_experts`` / ``moe_layers`` (the model's MoE layer indices) make a
    placement solved for another model fail here, by name, instead of
    inside the workers.
    """
    placement, meta = load_placement(path)
    if num_experts is not None and placement.num_experts != num_experts:
        raise PlacementInvalid(
            f"{path} places {placement.num_experts} experts but the model has {num_experts}; "
            "solve a placement from a trace of this model"
        )
    if moe_layers is not None and list(meta.get("layer_ids", [])) != [int(i) for i in moe_layers]:
        raise PlacementInvalid(
            f"{path} is for MoE layers {meta.get('layer_ids')} but the model's MoE layers are {list(moe_layers)}; "
            "solve a placement from a trace of this model"
        )
    if ep is not None and placement.num_ranks != ep:
        raise PlacementInvalid(f"{path} places experts on {placement.num_ranks} ep ranks but the plan has ep={ep}; "
                               f"solve it with --ranks {ep}")
    return placement
