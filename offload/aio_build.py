"""Pre-build DeepSpeed's async I/O op once per Python environment (``make test`` runs this).

    python -m tessera.offload.aio_build [--stamp PATH]

The op JIT-compiles in about 5 minutes on 2 cores, so tessera never compiles
it on its own (``reader="auto"`` uses it only when it is already built). This
command builds it, and DeepSpeed's ``pin_memory`` op it links against, into
:func:`tessera.offload.aio.env_extensions_dir`: a directory inside this
environment keyed by Python, torch, deepspeed and the CPU, where every process
of the environment (tests, Ray workers) finds it without any variable set. A
second run finds the library and returns at once.

It never fails the caller: where the op cannot be built (no libaio headers,
no compiler, no deepspeed) it says why, writes that reason to ``--stamp`` and
exits 0, and the aio tests skip with that reason while the O_DIRECT preadv
reader is used and tested. Installing the headers is the caller's job
(``apt-get install libaio-dev`` as root; the Makefile does it when it can).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

STAMP_READY = "ready"
STAMP_UNAVAILABLE = "unavailable"
LOAD_CHECK_TIMEOUT_S = 300


def _load_in_fresh_process() -> str | None:
    """None when a new interpreter of this environment loads the op without compiling, else why not."""
    code = "from tessera.offload.aio import load_aio, AioReader; load_aio(); AioReader().close()"
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              timeout=LOAD_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"loading the op took over {LOAD_CHECK_TIMEOUT_S}s"
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["no message"])[-1][:300]
    return None


def prebuild() -> tuple[bool, str]:
    """Build the op into this environment's extensions dir unless it loads already; ``(ready, message)``."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: no accelerator probe
    from tessera.offload.aio import _aio_builder, aio_built, env_extensions_dir

    if aio_built() and _load_in_fresh_process() is None:
        return True, "DeepSpeed aio op already built"
    try:
        builder = _aio_builder()
    except Exception as exc:  # noqa: BLE001
        return False, f"deepspeed is not importable here ({exc})"
    if not builder.is_compatible(verbose=False):
        return False, ("DeepSpeed aio op cannot be built here: libaio headers missing "
                       "(apt-get install libaio-dev as root, then rerun)")
    target = env_extensions_dir()
    target.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(target)  # this process only: where the JIT writes
    print(f"building DeepSpeed's aio op once into {target} (about 5 minutes on 2 cores)...", file=sys.stderr,
          flush=True)
    started = time.perf_counter()
    try:
        builder.load(verbose=False)
    except Exception as exc:  # noqa: BLE001 - e.g. no compiler, no ninja
        return False, f"building the DeepSpeed aio op failed: {str(exc).strip().splitlines()[-1][:300]}"
    why = _load_in_fresh_process()
    if why is not None:
        return False, f"the DeepSpeed aio op built but does not load: {why}"
    return True, f"DeepSpeed aio op built in {time.perf_counter() - started:.0f}s into {target}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stamp", help="file to write the outcome to ('ready: ...' or 'unavailable: ...')")
    args = ap.parse_args(argv)
    try:
        ready, message = prebuild()
    except Exception as exc:  # noqa: BLE001 - never fail the test run over an optional reader
        ready, message = False, f"pre-building the DeepSpeed aio op failed: {exc!r}"[:400]
    print(f"aio: {message}", file=sys.stderr, flush=True)
    if args.stamp:
        Path(args.stamp).write_text(f"{STAMP_READY if ready else STAMP_UNAVAILABLE}: {message}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
