"""Sliced, memory-mapped safetensors reads for one rank.

Every rank opens the checkpoint with ``safe_open`` and reads only its own
slices through ``get_slice`` (rows or columns of a tensor), so a rank never
materialises a full tensor it does not own. Missing tensors, wrong shapes and
dtypes raise :class:`CheckpointError` naming the tensor and the file.

Block-quantized FP8 checkpoints (``quantization_config`` with ``weight_block_size``,
``models.fp8``): an ``F8_E4M3`` weight is read with its ``weight_scale_inv``, the slice
widened to whole blocks, dequantized into the requested dtype and trimmed, so
callers see the same tensors as from a bf16 checkpoint. :meth:`CheckpointReader.read_fp8`
is the seam for keeping the FP8 blocks resident instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tessera.config import ConfigError
from tessera.models.fp8 import FP8_DTYPE, SCALE_SUFFIX, FP8Block, FP8Quantization, block_range, parse_quantization

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded; the message names the tensor, the file and the fix."""


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found; pass the directory of a Hugging Face checkpoint (config.json + *.safetensors)"
        )
    return json.loads(path.read_text())


def weight_files(model_dir: str | Path) -> dict[str, str]:
    """tensor name -> file name, from ``model.safetensors.index.json`` or the single ``model.safetensors``."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = root / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {k: single.name for k in f.keys()}
    pickles = sorted(p.name for p in root.glob("*.bin"))
    hint = f" (found {', '.join(pickles)}: tessera loads only safetensors, never pickles)" if pickles else ""
    raise CheckpointError(
        f"no model.safetensors or model.safetensors.index.json in {root}{hint}; "
        "save the model with save_pretrained(..., safe_serialization=True)"
    )


class CheckpointReader:
    """Reads named tensors, or row/column ranges of them, from a safetensors checkpoint.

    ``quantization``: the checkpoint's FP8 block layout; by default read from its
    ``config.json`` (None when the config has no ``quantization_config``).
    """

    def __init__(self, model_dir: str | Path, expected_dtype: str | None = None,
                 quantization: FP8Quantization | None | str = "config") -> None:
        self.root = Path(model_dir)
        self.files = weight_files(self.root)
        self.expected_dtype = expected_dtype
        if quantization == "config":
            quantization = parse_quantization(read_config(self.root)) if (self.root / "config.json").is_file() else None
        self.quantization = quantization
        self._handles: dict[str, Any] = {}
        self.bytes_read = 0

    def _slice(self, name: str):
        from safetensors import safe_open

        file = self.files.get(name)
        if file is None:
            raise CheckpointError(
                f"tensor {name!r} is missing from the checkpoint in {self.root} "
                f"({len(self.files)} tensors in {', '.join(sorted(set(self.files.values())))}); "
                "the checkpoint does not match its config.json architecture"
            )
        handle = self._handles.get(file)
        if handle is None:
            path = self.root / file
            if not path.is_file():
                raise CheckpointError(f"tensor {name!r} is mapped to {path}, which does not exist; the index is stale")
            handle = self._handles[file] = safe_open(str(path), "pt")
        return handle.get_slice(name), file

    def has(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        sl, _ = self._slice(name)
        return tuple(sl.get_shape())

    def read(
        self,
        name: str,
        expect_shape: tuple[int, ...] | None = None,
        dim: int | None = None,
        start: int = 0,
        stop: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Read ``name`` (or ``[start:stop]`` along ``dim``), checking its full shape and dtype first."""
        sl, file = self._slice(name)
        shape = tuple(sl.get_shape())
        if expect_shape is not None and shape != tuple(expect_shape):
            raise CheckpointError(
                f"tensor {name!r} in {self.root / file} has shape {list(shape)}, but config.json implies "
                f"{list(expect_shape)}; the weights and config.json do not belong together"
            )
        if sl.get_dtype() == FP8_DTYPE:  # block-quantized: dequantize into the requested (else declared) dtype
            block = self.read_fp8(name, dim, start, stop)
            target = dtype or getattr(torch, self.expected_dtype or "float32")
            return block.dequantize(target)
        st_dtype = _ST_DTYPES.get(sl.get_dtype())
        if st_dtype is None or (
            self.expected_dtype is not None and st_dtype not in (self.expected_dtype, "float32")
        ):
            raise CheckpointError(
                f"tensor {name!r} in {self.root / file} has dtype {sl.get_dtype()}, but config.json declares "
                f"{self.expected_dtype}; re-save the checkpoint in one floating dtype"
            )
        if dim is None:
            tensor = sl[:]
        else:
            stop = shape[dim] if stop is None else stop
            index = tuple([slice(None)] * dim + [slice(start, stop)])
            tensor = sl[index]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor.to(dtype) if dtype is not None else tensor

    def read_fp8(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> FP8Block:
        """The FP8 blocks of ``name`` covering ``[start:stop]`` along ``dim`` (all of it when ``dim`` is None), not dequantized.

        Reads the float8 data widened to whole ``weight_block_size`` blocks and exactly the
        ``weight_scale_inv`` rows/columns of those blocks; the returned :class:`FP8Block`
        knows the trim back to ``[start:stop]``. This is the FP8-resident seam (see ``models.fp8``).
        """
        sl, file = self._slice(name)
        shape = tuple(sl.get_shape())
        quant = self.quantization
        if quant is None:
            raise CheckpointError(
                f"tensor {name!r} in {self.root / file} is {sl.get_dtype()} but config.json has no block-FP8 "
                "quantization_config (quant_method 'fp8' with weight_block_size); the checkpoint and its "
                "config.json do not belong together"
            )
        if len(shape) != 2:
            raise CheckpointError(f"FP8 tensor {name!r} in {self.root / file} has shape {list(shape)}; block-FP8 "
                                  "weights are 2-D linear weights")
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.files:
            raise CheckpointError(
                f"FP8 tensor {name!r} in {self.root / file} has no {scale_name!r}; tessera reads block-quantized FP8 "
                "(one float32 weight_scale_inv per weight_block_size block), not per-tensor or per-channel scales"
            )
        scale_sl, scale_file = self._slice(scale_name)
        want = quant.scale_shape(shape)
        if tuple(scale_sl.get_shape()) != want:
            raise CheckpointError(
                f"{scale_name!r} in {self.root / scale_file} has shape {list(scale_sl.get_shape())}, but a "
                f"{list(shape)} weight with weight_block_size {list(quant.block)} needs {list(want)}"
            )
        if dim is None:
            block = FP8Block(sl[:], scale_sl[:], quant.block)
        else:
            stop = shape[dim] if stop is None else stop
            b = quant.block[dim]
            lo, hi = block_range(start, stop, shape[dim], b)
            index = lambda a, z: tuple([slice(None)] * dim + [slice(a, z)])  # noqa: E731
            data, scales = sl[index(lo, hi)], scale_sl[index(lo // b, -(-hi // b))]
            block = FP8Block(data, scales, quant.block, dim, start - lo, stop - lo)
        self.bytes_read += block.nbytes
        return block

    def close(self) -> None:
        self._handles.clear()
