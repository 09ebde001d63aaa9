"""How long a fault costs, per kind: detect, restart (worker start apart), reload, replay; requests kept.

For each fault kind (a worker killed, a worker stalled with SIGSTOP, a worker
killed and then another killed while the engine reloads) on the MoE engine
(tiny Mixtral, tp=2 and ep=2) and the diffusion engine (tiny PixArt, sp=2),
a batch of requests runs with the fault injected mid-way; the engine's own
recovery records split the time (``runtime/recovery.RecoveryRecord``):

- ``detect_s``: from the faulted call's start to the fault's report (a death is
  reported by Ray at once; a stall by the step deadline);
- ``restart_s``: the controller's restart, of which ``worker_start_s`` is Ray
  starting the actors and their Python imports (reported apart: it is not
  tessera's time; libraries an engine imports lazily, such as the text encoder's,
  are imported in the reload or the replay and count there);
- ``reload_s``: the shards read again; ``replay_s``: the work lost to the fault
  run again (the interrupted step; the steps since an image's last checkpoint,
  or the whole image without one); ``own_s`` = restart - worker start + reload + replay (tessera's
  recovery work once the fault is known; detection is reported apart); ``total_s`` = detect + restart +
  reload + replay: all the time the fault cost, worker start included;
- ``resume_step``: the denoising step a checkpointed image resumed from (0: rerun from its seed);
- ``added_latency_s`` (images): the faulted image's latency less its fault-free latency: what the fault
  cost that request, end to end (``replay_s`` of an image rerun from its seed also counts the steps the
  fault never reached).

Every request must complete with the fault-free tokens / latents
(``completed`` / ``submitted``). Results: ``benchmarks/results/recovery.json``.

    python -m tessera.benchmarks.bench_recovery [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import torch

from tessera.benchmarks._common import print_table, write_result
from tessera.config import ParallelPlan, Timeouts
from tessera.memory.placement import Placement
from tessera.options import RecoveryPolicy
from tessera.runtime.controller import Controller

TIMEOUTS = Timeouts(call_s=120, worker_start_s=180, process_group_s=60)
POLICY = RecoveryPolicy(stall_floor_s=3.0, stall_factor=10.0, backoff_s=0.0)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def llm_case(model_dir: Path, plan: dict, kind: str) -> dict:
    from tessera.runtime.llm.engine import LLMEngine, SamplingParams

    prompts = [[(7 * i + j) % 90 + 1 for j in range(6 + i % 5)] for i in range(8)]
    params = [SamplingParams(max_new_tokens=12, temperature=0.0 if i % 2 else 0.8, seed=i) for i in range(8)]
    with Controller(Placement(ParallelPlan(plan)), timeouts=TIMEOUTS) as ctl:
        engine = LLMEngine.load(ctl, model_dir, decode_steps=1, max_num_seqs=8, recovery=POLICY)
        want = [r.token_ids for r in engine.generate(prompts, params)]
        reload = engine.recovery.reload
        armed = {"again": kind == "kill during recovery"}

        def reload_with_a_kill():
            if armed["again"]:
                armed["again"] = False
                _kill(ctl.describe()[0].pid, signal.SIGKILL)
            reload()

        engine.recovery.reload = reload_with_a_kill
        ids = [engine.add_request(p, s) for p, s in zip(prompts, params)]
        stopped = None
        for step in range(400):
            if not engine.has_unfinished():
                break
            if step == 4:
                victim = ctl.describe()[1].pid
                if kind == "stall":
                    stopped = victim
                    _kill(victim, signal.SIGSTOP)
                else:
                    _kill(victim, signal.SIGKILL)
            engine.step()
        if stopped is not None:
            _kill(stopped, signal.SIGKILL)
        got = [engine.result(i).token_ids for i in ids]
        records = engine.recovery.summary()
        engine.close()
    return {"completed": sum(g == w for g, w in zip(got, want)), "submitted": len(prompts), "records": records}


def dit_case(model_dir: Path, kind: str, steps: int = 30, checkpoint_s: float | None = 0.5) -> dict:
    """One image of ``steps`` steps; the fault a third of the way in. 30 steps take less than the default
    0.5 s checkpoint interval (one rpc: rerun from the seed); 200 steps are checkpointed and resume (or, with
    ``checkpoint_s=None``, rerun from the seed: the comparison)."""
    from tessera.runtime.diffusion.engine import DiffusionEngine

    args = dict(steps=steps, height=64, width=64, seed=4, output="latent")
    with Controller(Placement(ParallelPlan({"sp": 2})), timeouts=TIMEOUTS) as ctl:
        engine = DiffusionEngine.load(ctl, model_dir, progress=False, recovery=POLICY, checkpoint_s=checkpoint_s)
        want = engine.generate_images(["a red square"], **args)[0]
        engine.generate_images(["a red square"], **args)
        seconds = engine.stats()["last"]["seconds"]
        reload = engine.recovery.reload
        armed = {"again": kind == "kill during recovery"}

        def reload_with_a_kill():
            if armed["again"]:
                armed["again"] = False
                _kill(ctl.describe()[0].pid, signal.SIGKILL)
            reload()

        engine.recovery.reload = reload_with_a_kill
        victim = ctl.describe()[1].pid
        sig = signal.SIGSTOP if kind == "stall" else signal.SIGKILL
        timer = threading.Timer(seconds / 3, _kill, args=(victim, sig))
        timer.start()
        started = time.perf_counter()
        got = engine.generate_images(["a red square"], **args)[0]
        faulted = time.perf_counter() - started
        timer.join()
        _kill(victim, signal.SIGKILL)
        records = engine.stats()["recovery"]
        engine.close()
    return {"completed": int(torch.equal(got, want)), "submitted": 1, "records": records,
            "request_s": faulted, "fault_free_s": seconds}


def _summary(runs: list[dict]) -> dict:
    records = [r for run in runs for r in run["records"]]
    out = {"completed": sum(r["completed"] for r in runs), "submitted": sum(r["submitted"] for r in runs),
           "recoveries": len(records), "attempts": sum(r["attempts"] for r in records)}
    if all("request_s" in r for r in runs):  # an image: its latency with the fault, less its fault-free latency
        added = [r["request_s"] - r["fault_free_s"] for r in runs]
        out["added_latency_s"] = {"median": statistics.median(added), "min": min(added), "max": max(added)}
        out["fault_free_s"] = statistics.median(r["fault_free_s"] for r in runs)
    for key in ("detect_s", "restart_s", "worker_start_s", "reload_s", "replay_s", "own_s", "total_s",
                "resume_step"):
        values = [r[key] for r in records]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from tessera.models.tiny_diffusion import build_tiny_diffusion, default_cache_dir
    from tessera.models.tiny_moe import build_tiny_moe
    from tessera.runtime.ray_env import RayConnection

    cache = default_cache_dir()
    moe = build_tiny_moe("mixtral", cache / "bench-recovery-mixtral")
    pixart = build_tiny_diffusion("pixart", cache / "bench-recovery-pixart")
    RayConnection.acquire(num_cpus=8)
    results: dict = {"repeats": args.repeats, "cases": {}}
    try:
        kinds = ("kill", "stall", "kill during recovery")
        cases = [(f"llm {plan} {kind}", lambda plan=plan, kind=kind: llm_case(moe, {plan[:2]: 2}, kind))
                 for plan in ("tp=2", "ep=2") for kind in kinds]
        cases += [(f"dit sp=2 {kind}", lambda kind=kind: dit_case(pixart, kind)) for kind in kinds]
        cases += [(f"dit sp=2 {kind}, 200 steps", lambda kind=kind: dit_case(pixart, kind, steps=200))
                  for kind in ("kill", "stall")]
        cases += [("dit sp=2 kill, 200 steps, no checkpoints",
                   lambda: dit_case(pixart, "kill", steps=200, checkpoint_s=None))]
        for name, run in cases:
            started = time.perf_counter()
            runs = [run() for _ in range(args.repeats)]
            results["cases"][name] = {**_summary(runs), "wall_s": time.perf_counter() - started,
                                      "loadavg": os.getloadavg()}
            print(f"{name}: {results['cases'][name]}", flush=True)
    finally:
        RayConnection.release()
    rows = []
    for name, c in results["cases"].items():
        med = lambda k: f"{c[k]['median']:.2f} [{c[k]['min']:.2f}-{c[k]['max']:.2f}]" if k in c else "-"  # noqa: E731
        rows.append([name, f"{c['completed']}/{c['submitted']}", c["attempts"], med("detect_s"), med("worker_start_s"),
                     med("restart_s"), med("reload_s"), med("replay_s"), med("own_s"), med("total_s"),
                     med("added_latency_s")])
    print_table("recovery per fault (median [min-max] over repeats)",
                ["case", "completed", "restarts", "detect s", "worker start s", "restart s", "reload s", "replay s",
                 "tessera's own s (no detect)", "total s", "image latency added s"], rows)
    write_result("recovery", results)
    return 0 if all(c["completed"] == c["submitted"] for c in results["cases"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
