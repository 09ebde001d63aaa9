"""One log-level switch for the driver and every worker.

The level comes from ``--log-level`` / ``JobSpec.log_level`` or, when neither
is given, from ``TESSERA_LOG_LEVEL`` (read when logging is configured, never
written: the controller hands each worker its level explicitly). Worker lines carry ``[rank N]`` so that
interleaved output from many ranks stays readable.
"""

from __future__ import annotations

import logging
import os
import sys

LOG_LEVEL_ENV = "TESSERA_LOG_LEVEL"


def default_log_level() -> str:
    return os.environ.get(LOG_LEVEL_ENV, "INFO").upper()


def configure_logging(level: str | None = None, rank: int | None = None) -> None:
    """Configure the ``tessera`` logger (idempotent)."""
    level = (level or default_log_level()).upper()
    prefix = f"[rank {rank}] " if rank is not None else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("tessera")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
