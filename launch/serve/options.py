"""Typed options of a tessera server (``tessera serve`` flags, ``tessera.serve(...)`` keywords), validated once.

Secure by default: the server binds 127.0.0.1; binding to any other address
needs an API key (clients send ``Authorization: Bearer KEY``), so a server
reachable from the network is never open. The key is never printed (it is
left out of ``repr``) and comes from ``$TESSERA_API_KEY`` or a file, not
from a command-line flag (which every user of the machine can read in
``ps``).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tessera.errors import ConfigError

API_KEY_ENV = "TESSERA_API_KEY"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,127}")
_APP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: str | None = None) -> str | None:
    """The API key from ``path`` (first line; the file should be private) or ``$TESSERA_API_KEY``; None if neither."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"API key file {str(p)!r} does not exist; write the key to it (mode 0600)")
        if p.stat().st_mode & 0o077:
            raise ConfigError(f"API key file {p} is readable by other users; chmod 600 {p}")
        lines = p.read_text().splitlines()
        return lines[0].strip() if lines else ""
    return os.environ.get(API_KEY_ENV) or None


IMAGE_BATCHING = ("exact", "fast")  # see ServeOptions.image_batching


@dataclass(frozen=True)
class ServeOptions:
    """How the HTTP service runs.

    ``host``/``port``: where Ray Serve's proxy listens (127.0.0.1 unless asked).
    ``api_key``: required Bearer token (required when ``host`` is not loopback).
    ``served_model_name``: the ``model`` clients name (default: the checkpoint folder's name).
    ``max_waiting``: requests that may wait to start before new ones get 429 (with ``Retry-After``).
    ``retry_after_s``: the wait a 429 suggests. ``max_ongoing_requests``: Ray Serve's cap of
    concurrent requests in the replica (above it Serve queues in its proxy; keep it above
    ``max_waiting`` plus the engine's ``max_num_seqs``, so the 429 is tessera's).
    ``max_image_batch``: images one denoising loop may hold (concurrent image requests of one size,
    step count, mode and guidance share a loop); 1 runs every request alone.
    ``image_batching``: "exact" (default): a batched image gets the bits it gets alone (one forward per
    image inside the shared loop); "fast": one forward for the batch (more images/s where larger matmuls
    pay, as on GPUs; each image equals its run alone to fp32 rounding).
    ``app_name``: the Ray Serve application's name. ``ready_timeout_s``: how long starting may take
    (loading the model included). ``shutdown_timeout_s``: how long a graceful stop may take.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    served_model_name: str | None = None
    max_waiting: int = 256
    retry_after_s: float = 1.0
    max_ongoing_requests: int = 4096
    max_image_batch: int = 8
    image_batching: str = "exact"
    app_name: str = "tessera"
    ready_timeout_s: float = 900.0
    shutdown_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host is {self.host!r}; give an IP address such as 127.0.0.1")
        if self.host != "localhost":
            try:
                ipaddress.ip_address(self.host)
            except ValueError:
                raise ConfigError(f"host {self.host!r} is not an IP address; use 127.0.0.1 (the default), "
                                  "0.0.0.0 (every interface) or the address of one interface") from None
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ConfigError(f"port is {self.port!r}; it must be an integer in 1..65535")
        if self.api_key is not None:
            if not isinstance(self.api_key, str) or not self.api_key or any(c.isspace() for c in self.api_key):
                raise ConfigError("the API key is empty or contains whitespace; use a random token such as the "
                                  "output of `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        if not is_loopback(self.host) and not self.api_key:
            raise ConfigError(
                f"host {self.host} reaches beyond this machine, so the server needs an API key: set "
                f"${API_KEY_ENV} (or --api-key-file FILE) and clients send 'Authorization: Bearer KEY'; "
                "or bind 127.0.0.1"
            )
        if self.served_model_name is not None and (not isinstance(self.served_model_name, str)
                                                   or not _NAME.fullmatch(self.served_model_name)):
            raise ConfigError(f"served_model_name {self.served_model_name!r}: use up to 128 letters, digits and "
                              "_ . : / @ + -")
        if not isinstance(self.app_name, str) or not _APP.fullmatch(self.app_name):
            raise ConfigError(f"app_name {self.app_name!r}: use up to 64 letters, digits, _ and -")
        for name in ("max_waiting", "max_ongoing_requests", "max_image_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_waiting" else 1):
                raise ConfigError(f"{name} is {value!r}; it must be an integer >= {0 if name == 'max_waiting' else 1}")
        if self.image_batching not in IMAGE_BATCHING:
            raise ConfigError(f"image_batching is {self.image_batching!r}; use one of {', '.join(IMAGE_BATCHING)}")
        for name in ("retry_after_s", "ready_timeout_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} is {value!r}; it must be a number of seconds > 0")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "localhost") else self.host
        if ":" in host:
            host = f"[{host}]" if host != "::" else "[::1]"
        return f"http://{host}:{self.port}"
