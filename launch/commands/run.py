"""``tessera run``: run one job, from a YAML job file and/or flags, and print its result.

This is the one entry point of every batch surface: ``ray job submit ... --
tessera run job.yaml``, ``tessera submit`` and the SLURM batch scripts all end
here. The last line of stdout is ``result: {json}`` (machine-readable);
``--output`` also writes that JSON to a file. Exit 0 when the task succeeded,
1 when it ran and failed (a rank error, a wrong collective, a generation
error), 2 for a job that cannot work (reported before workers start).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tessera.launch.jobfile import TASKS, JobFile

RESULT_PREFIX = "result: "
# The CLI imports every command module while building its parser, so this is
# (within milliseconds) when the `tessera` command finished starting Python.
CLI_LOADED_UNIX = time.time()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run one job (generate, images or mesh) from a YAML job file and/or flags",
        description="Run one job and print its result; the last stdout line is 'result: {json}'. "
        "Flags override the job file. Without --cluster, Ray is embedded unless $RAY_ADDRESS "
        "names a cluster (as under `ray job submit` and in SLURM scripts). "
        "Exit codes: 0 ok, 1 the job ran and failed, 2 the job cannot work (checked before workers start).",
        epilog="examples:\n"
        "  tessera run job.yaml\n"
        "  tessera run --task mesh --plan pp=2,tp=2\n"
        "  tessera run --model tiny-moe:mixtral --plan ep=2 --prompt Hello --max-new-tokens 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job", nargs="?", help="YAML job file (see clusters/README.md for its keys)")
    add_job_flags(parser)
    parser.add_argument("--output", help="also write the result JSON to this file")
    parser.set_defaults(func=_run)


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that override a job file's keys (shared with ``tessera plan``)."""
    group = parser.add_argument_group("job (override the file)")
    group.add_argument("--task", choices=list(TASKS), help="; ".join(f"{k}: {v}" for k, v in TASKS.items()))
    group.add_argument("--model", help="checkpoint directory, tiny-moe:<family> or tiny-diffusion:<family>")
    group.add_argument("--plan", help="degrees such as tp=2,ep=2, or auto")
    group.add_argument("--device", choices=["cpu", "cuda"])
    group.add_argument("--cluster", help="local (embedded Ray), auto, or a GCS address HOST:PORT")
    group.add_argument("--cpus-per-rank", type=float)
    group.add_argument("--min-nodes", type=int, help="wait for this many Ray nodes before placing")
    group.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT", help="a prompt (repeatable)")
    group.add_argument("--max-new-tokens", type=int)
    group.add_argument("--temperature", type=float)
    group.add_argument("--seed", type=int)
    group.add_argument("--stream", action="store_true", default=None, help="print token ids as they are produced")
    group.add_argument("--steps", type=int, help="denoising steps (images)")
    group.add_argument("--image-size", type=int, help="height and width in pixels (images)")


def jobfile_from_args(args: argparse.Namespace) -> JobFile:
    """The job file (if any) with the flags applied; errors are ConfigErrors (exit 2)."""
    if args.job:
        jobfile = JobFile.from_yaml(args.job)
    else:
        base: dict[str, Any] = {"plan": args.plan or "auto", "name": "cli-job"}
        if args.model:
            base["model"] = args.model
        jobfile = JobFile.from_dict(base)
    sampling = dict(jobfile.sampling)
    for key in ("max_new_tokens", "temperature", "seed"):
        if getattr(args, key, None) is not None:
            sampling[key] = getattr(args, key)
    images = jobfile.images
    if args.steps is not None or args.image_size is not None:
        from dataclasses import replace

        size = args.image_size
        images = replace(
            images,
            steps=args.steps or images.steps,
            height=size or images.height,
            width=size or images.width,
        )
    task = args.task
    if task is None and not args.job and args.model is None:
        task = "mesh"
    return jobfile.with_overrides(
        task=task,
        model=args.model,
        plan=args.plan,
        device=args.device,
        cluster=args.cluster,
        cpus_per_rank=args.cpus_per_rank,
        min_nodes=args.min_nodes,
        prompts=tuple(args.prompts) if args.prompts else None,
        sampling=sampling,
        stream=args.stream,
        images=images,
        output=getattr(args, "output", None),
        log_level=getattr(args, "log_level", None),  # `tessera --log-level` reaches every worker
    )


def _run(args: argparse.Namespace) -> int:
    jobfile = jobfile_from_args(args)
    jobfile.check_runnable()
    result = execute(jobfile)
    return 0 if result["ok"] else 1


def _process_start() -> float:
    """When this process started (unix s), so first-result latency includes imports."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - psutil comes with ray[default]; fall back to now
        return time.time()


def execute(jobfile: JobFile, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Launch, run the task, print and return the result; always shuts the handle down."""
    from tessera.launch.api import launch_job

    started = _process_start()
    job = jobfile.job
    echo(f"tessera run: job {jobfile.name!r}: task {jobfile.task}, plan "
         f"{'auto' if jobfile.plan_auto else job.plan}, device {job.device}, model {job.model or '-'}")
    result: dict[str, Any] = {"name": jobfile.name, "task": jobfile.task, "ok": False}
    with launch_job(jobfile) as handle:
        echo(handle.describe())
        t_ready = time.time()
        if jobfile.task == "mesh":
            check = handle.check_mesh(jobfile.mesh_payload_bytes)
            echo(f"collectives over each dim: {'all correct' if check['correct'] else 'WRONG: ' + ', '.join(check['failures'])}")
            result.update(ok=check["correct"], mesh=check)
        elif jobfile.task == "generate":
            result.update(_generate(handle, jobfile, echo))
        else:
            result.update(_images(handle, jobfile, echo))
        t_done = time.time()
        if job.offload is not None and jobfile.task != "mesh":  # what the tiers did, per rank (proof they ran)
            result["offload"] = handle.offload_stats()
        result["placement"] = [
            {"rank": r.rank, "node_id": r.node_id, "node_ip": r.node_ip, "hostname": r.hostname, "pid": r.pid,
             "device": r.device, "coords": r.coords}
            for r in handle.ranks
        ]
        result["nodes"] = len({r.node_id for r in handle.ranks})
        result["plan"] = dict(handle.placement.plan.degrees)
        result["timings"] = {
            "process_start_unix": started,
            "cli_loaded_unix": CLI_LOADED_UNIX,
            "ready_unix": t_ready,
            "first_result_unix": result.pop("_first_result_unix", t_done),
            "done_unix": t_done,
            "launch_s": {**handle.timings.__dict__, "total_s": handle.timings.total_s},
            "controller_startup_s": dict(handle.controller.startup_timings),
        }
    line = json.dumps(result, default=str)
    if jobfile.output:
        Path(jobfile.output).parent.mkdir(parents=True, exist_ok=True)
        Path(jobfile.output).write_text(line + "\n")
    echo(RESULT_PREFIX + line)
    if not result["ok"]:
        print(f"tessera run: job {jobfile.name!r} failed: {result.get('error', 'see the result above')}", file=sys.stderr)
    return result


def _generate(handle: Any, jobfile: JobFile, echo: Callable[[str], None]) -> dict[str, Any]:
    sampling = jobfile.sampling or {}
    outputs = []
    first_unix = None
    if jobfile.stream:
        for prompt in jobfile.prompts:
            tokens = []
            echo(f"stream {prompt!r}:")
            for token in handle.stream(prompt, **sampling):
                first_unix = first_unix or time.time()
                tokens.append(int(token))
                echo(f"  token {token}")
            outputs.append({"prompt": prompt, "token_ids": tokens, "text": None, "finish_reason": "stream"})
    else:
        for prompt, res in zip(jobfile.prompts, handle.generate(list(jobfile.prompts), **sampling)):
            first_unix = first_unix or time.time()
            outputs.append({
                "prompt": prompt, "token_ids": list(res.token_ids), "text": res.text,
                "finish_reason": res.finish_reason, "error": res.error,
            })
            echo(f"{prompt!r} -> {res.text!r} tokens {list(res.token_ids)} ({res.finish_reason})")
    errors = [o for o in outputs if o.get("finish_reason") == "error"]
    out: dict[str, Any] = {"ok": not errors, "generations": outputs, "_first_result_unix": first_unix or time.time()}
    if errors:
        out["error"] = f"{len(errors)} prompt(s) failed; first: {errors[0].get('error')}"
    return out


def _images(handle: Any, jobfile: JobFile, echo: Callable[[str], None]) -> dict[str, Any]:
    images = handle.generate_images(list(jobfile.prompts), **jobfile.images.engine_kwargs())
    first_unix = time.time()
    out_dir = Path(jobfile.images.output_dir or f"{jobfile.name}-images")
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for i, (prompt, image) in enumerate(zip(jobfile.prompts, images)):
        path = out_dir / f"{i:03d}.png"
        image.save(path)
        saved.append({"prompt": prompt, "path": str(path.resolve()), "size": list(image.size)})
        echo(f"{prompt!r} -> {path} {image.size[0]}x{image.size[1]}")
    ok = len(saved) == len(jobfile.prompts)
    out: dict[str, Any] = {"ok": ok, "images": saved, "_first_result_unix": first_unix}
    if not ok:
        out["error"] = f"engine returned {len(images)} image(s) for {len(jobfile.prompts)} prompt(s)"
    return out
