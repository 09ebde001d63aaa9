"""Shared helpers of the serving tests (not a test module): free ports, prompts, bounded waits."""

from __future__ import annotations

import socket
import time

WORDS = ("tessera runs mixture of experts language models across many workers the router sends every token to "
         "its top experts paged attention keeps the keys and values the quick brown fox jumps over the lazy dog").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(i: int) -> str:
    """A different short text prompt for every i (3 to 11 words of the tiny tokenizer's text)."""
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 9))


def wait_until(check, timeout_s: float, what: str, every_s: float = 0.2):
    """Poll ``check`` until it returns something truthy (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:.0f}s for {what}")
        time.sleep(every_s)
