"""One log-level switch; worker lines carry their rank."""

from __future__ import annotations

import logging

from tessera.runtime.logs import LOG_LEVEL_ENV, configure_logging
from tessera.runtime.worker import Worker


def test_worker_lines_are_prefixed_with_the_rank_and_follow_the_level(capsys, monkeypatch):
    monkeypatch.setenv(LOG_LEVEL_ENV, "INFO")
    worker = Worker(rank=3, world_size=4, device_kind="cpu", log_level="WARNING")
    assert repr(worker) == "rank3"  # Ray prefixes actor output with this
    log = logging.getLogger("tessera.engine")
    log.info("hidden at WARNING")
    log.warning("shown at WARNING")
    err = capsys.readouterr().err
    assert "[rank 3] WARNING tessera.engine: shown at WARNING" in err
    assert "hidden" not in err
    configure_logging("DEBUG", rank=0)
    log.debug("now shown")
    assert "[rank 0] DEBUG tessera.engine: now shown" in capsys.readouterr().err


def test_level_comes_from_the_environment_when_not_given(capsys, monkeypatch):
    monkeypatch.setenv(LOG_LEVEL_ENV, "ERROR")
    configure_logging()
    logging.getLogger("tessera.x").warning("quiet")
    logging.getLogger("tessera.x").error("loud")
    err = capsys.readouterr().err
    assert "loud" in err and "quiet" not in err
    configure_logging("INFO")
