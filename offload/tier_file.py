"""The NVMe tier file: 4 KiB-aligned extents, one per weight group, plus a JSON manifest.

Layout: each weight group is one extent starting on a 4096-byte boundary and
padded to a multiple of 4096, so a group is exactly one O_DIRECT read. Inside
an extent the group's tensors sit at 64-byte aligned offsets (any dtype can be
viewed in place). The manifest records, per group, its offset, size and a
CRC32 of the whole padded extent, and per tensor its name, dtype, shape and
offset; plus a fingerprint of the source checkpoint so a later run reuses the
file only when the checkpoint has not changed.

Writes are crash-safe: data goes to ``NAME.tier.tmp``, is fsynced and renamed,
and the manifest is written (and renamed) last, so a half-written file never
has a valid manifest and is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from tessera.offload.buffers import align_up
from tessera.options import ALIGNMENT
from tessera.offload.errors import CorruptTierFileError, DiskSpaceError, TierDirError, TierFileError

FORMAT = "tessera-tier/1"
TENSOR_ALIGN = 64


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # within the group's extent
    nbytes: int


@dataclass(frozen=True)
class GroupEntry:
    name: str
    offset: int  # in the file, multiple of ALIGNMENT
    nbytes: int  # padded extent length, multiple of ALIGNMENT
    checksum: int  # CRC32 of the padded extent
    tensors: tuple[TensorEntry, ...]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TierFileError(f"manifest names an unknown dtype {name!r}")
    return dtype


def layout_group(tensors: Mapping[str, torch.Tensor]) -> tuple[list[TensorEntry], int]:
    """Offsets of a group's tensors inside its extent, and the padded extent size."""
    entries, pos = [], 0
    for name, t in tensors.items():
        pos = align_up(pos, TENSOR_ALIGN)
        nbytes = t.numel() * t.element_size()
        entries.append(TensorEntry(name, _dtype_name(t.dtype), tuple(t.shape), pos, nbytes))
        pos += nbytes
    return entries, align_up(max(pos, 1))


def group_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """The padded extent size a group takes in a tier file (and in a read buffer)."""
    return layout_group(tensors)[1]


def pack_group(tensors: Mapping[str, torch.Tensor], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[TensorEntry]]:
    """The group's bytes as one padded uint8 extent (zero padding)."""
    entries, size = layout_group(tensors)
    buf = torch.zeros(size, dtype=torch.uint8) if out is None else out
    if out is not None:
        buf.zero_()
    for e, t in zip(entries, tensors.values()):
        flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        buf[e.offset : e.offset + e.nbytes].copy_(flat)
    return buf, entries


def unpack_group(buf: torch.Tensor, tensors: Iterable[TensorEntry]) -> dict[str, torch.Tensor]:
    """Views of a group's tensors inside ``buf`` (no copy)."""
    out = {}
    for e in tensors:
        raw = buf[e.offset : e.offset + e.nbytes]
        out[e.name] = raw.view(_dtype(e.dtype)).view(e.shape)
    return out


def checksum(buf: torch.Tensor) -> int:
    """CRC32 of a uint8 CPU tensor (zlib releases the GIL, so it runs on I/O threads in parallel)."""
    return zlib.crc32(memoryview(buf.numpy())) & 0xFFFFFFFF


def check_tier_dir(path: str | os.PathLike, need_bytes: int, min_free_bytes: int) -> Path:
    """Fail early and clearly if the tier directory cannot take a file of ``need_bytes``."""
    d = Path(path)
    if not d.exists():
        raise TierDirError(f"tier directory {d} does not exist; create it (mkdir -p {d}) or set nvme_dir elsewhere")
    if not d.is_dir():
        raise TierDirError(f"tier directory {d} is not a directory; point nvme_dir at a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".tessera-probe-"):
            pass
    except OSError as exc:
        raise TierDirError(
            f"tier directory {d} is not writable ({exc.strerror}); fix its permissions or set nvme_dir elsewhere"
        ) from exc
    free = shutil.disk_usage(d).free
    if free < need_bytes + min_free_bytes:
        raise DiskSpaceError(
            f"tier directory {d} has {free / 2**30:.2f} GiB free but the tier file needs "
            f"{need_bytes / 2**30:.2f} GiB (+{min_free_bytes / 2**20:.0f} MiB headroom); free space, "
            "use another nvme_dir, or raise the host/device budgets so fewer groups go to NVMe"
        )
    return d


class TierFile:
    """An opened, validated tier file: the manifest in memory, the data file on disk."""

    def __init__(self, data_path: Path, manifest: dict) -> None:
        self.path = data_path
        self.fingerprint: str = manifest["fingerprint"]
        self.groups: dict[str, GroupEntry] = {}
        for g in manifest["groups"]:
            tensors = tuple(
                TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"]) for t in g["tensors"]
            )
            self.groups[g["name"]] = GroupEntry(g["name"], g["offset"], g["nbytes"], g["checksum"], tensors)
        self.file_bytes: int = manifest["file_bytes"]

    @staticmethod
    def paths(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
        d = Path(directory)
        return d / f"{name}.tier", d / f"{name}.manifest.json"

    @classmethod
    def open(cls, directory: str | os.PathLike, name: str, fingerprint: str | None = None) -> "TierFile | None":
        """The tier file if it exists, is complete and (when given) matches ``fingerprint``; else None."""
        data, man = cls.paths(directory, name)
        if not data.exists() or not man.exists():
            return None
        try:
            manifest = json.loads(man.read_text())
        except (OSError, ValueError) as exc:
            raise TierFileError(f"tier manifest {man} is unreadable ({exc}); delete it to rebuild") from exc
        if manifest.get("format") != FORMAT:
            return None
        if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
            return None
        if data.stat().st_size != manifest.get("file_bytes"):
            return None  # truncated or replaced: rebuild
        return cls(data, manifest)

    def read_group(self, name: str) -> dict[str, torch.Tensor]:
        """Read and verify one group with plain buffered I/O (tests, tools; the hot path uses a Reader)."""
        g = self.groups[name]
        buf = torch.empty(g.nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(g.offset)
            f.readinto(memoryview(buf.numpy()))
        self.verify(g, buf)
        return unpack_group(buf, g.tensors)

    def verify(self, g: GroupEntry, buf: torch.Tensor) -> None:
        got = checksum(buf)
        if got != g.checksum:
            raise CorruptTierFileError(
                f"tier file {self.path}: weight group {g.name!r} at offset {g.offset} fails its checksum "
                f"(crc32 {got:08x}, manifest {g.checksum:08x}); the file is corrupt: delete it to rebuild"
            )

    def verify_all(self) -> list[str]:
        """Names of the groups whose bytes do not match their checksum."""
        bad = []
        for name in self.groups:
            try:
                self.read_group(name)
            except CorruptTierFileError:
                bad.append(name)
        return bad


class TierFileWriter:
    """Streams groups into a new tier file one at a time (a loader can hand over each group and drop it).

    ``total_bytes`` (the padded size of all groups) is checked against free
    disk space before the first byte is written. ``finish`` fsyncs, renames and
    writes the manifest last; ``abort`` removes the partial file.
    """

    def __init__(self, directory: str | os.PathLike, name: str, fingerprint: str, total_bytes: int, min_free_bytes: int = 0) -> None:
        self.dir = check_tier_dir(directory, total_bytes, min_free_bytes)
        self.data, self.man = TierFile.paths(self.dir, name)
        self.tmp_data, self.tmp_man = self.data.with_suffix(".tier.tmp"), self.man.with_suffix(".json.tmp")
        self.fingerprint = fingerprint
        self.entries: list[dict] = []
        self.offset = 0
        self._f = open(self.tmp_data, "wb")

    def add(self, gname: str, tensors: Mapping[str, torch.Tensor]) -> int:
        """Append one group; returns its padded size."""
        buf, tensor_entries = pack_group(tensors)
        try:
            self._f.write(memoryview(buf.numpy()))
        except OSError as exc:
            self.abort()
            if exc.errno == 28:  # ENOSPC
                raise DiskSpaceError(f"tier directory {self.dir} ran out of space while writing {self.data}; free space or use another nvme_dir") from exc
            raise
        self.entries.append(
            {
                "name": gname,
                "offset": self.offset,
                "nbytes": buf.numel(),
                "checksum": checksum(buf),
                "tensors": [
                    {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes}
                    for t in tensor_entries
                ],
            }
        )
        self.offset += buf.numel()
        return buf.numel()

    def finish(self) -> TierFile:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp_data, self.data)
            manifest = {
                "format": FORMAT, "fingerprint": self.fingerprint, "alignment": ALIGNMENT,
                "file_bytes": self.offset, "groups": self.entries,
            }
            self.tmp_man.write_text(json.dumps(manifest))
            os.replace(self.tmp_man, self.man)
        except OSError:
            self.abort()
            raise
        return TierFile(self.data, manifest)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        for p in (self.tmp_data, self.tmp_man):
            p.unlink(missing_ok=True)


def write_tier_file(
    directory: str | os.PathLike,
    name: str,
    groups: Iterable[tuple[str, Mapping[str, torch.Tensor]]],
    fingerprint: str,
    total_bytes: int,
    min_free_bytes: int = 0,
) -> TierFile:
    """Write groups (streamed: one group in memory at a time) into a new tier file; return it opened."""
    writer = TierFileWriter(directory, name, fingerprint, total_bytes, min_free_bytes)
    try:
        for gname, tensors in groups:
            writer.add(gname, tensors)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def rewrite_group(tier: TierFile, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Rewrite one group's extent in place from its source tensors (repairs a corrupt extent).

    The bytes must reproduce the manifest's checksum; if they do not, the
    checkpoint changed under the file and the whole file must be rebuilt.
    """
    g = tier.groups[name]
    buf, _ = pack_group(tensors)
    if buf.numel() != g.nbytes or checksum(buf) != g.checksum:
        raise TierFileError(
            f"group {name!r} rebuilt from the checkpoint does not match tier file {tier.path}'s manifest; "
            "the checkpoint changed: delete the tier file to rebuild it"
        )
    fd = os.open(tier.path, os.O_WRONLY)
    try:
        os.pwrite(fd, memoryview(buf.numpy()), g.offset)
        os.fsync(fd)
    finally:
        os.close(fd)
