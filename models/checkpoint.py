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


# config.json fields that, when present, must be positive integers (the families divide and
# allocate by them); ``None`` is allowed for the optional ones. A wrong type would otherwise
# surface as a TypeError deep inside a family's parse_config or on the workers.
_POSITIVE_INT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "moe_intermediate_size", "num_local_experts",
    "num_experts", "n_routed_experts", "num_experts_per_tok", "max_position_embeddings", "kv_lora_rank",
    "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group",
)
_NON_NEGATIVE_INT_FIELDS = ("n_shared_experts", "first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step",
                            "shared_expert_intermediate_size")
_OPTIONAL_FIELDS = ("head_dim", "q_lora_rank", "num_key_value_heads", "n_shared_experts", "n_group", "topk_group",
                    "moe_layer_freq", "decoder_sparse_step", "first_k_dense_replace", "shared_expert_intermediate_size",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


class ModelConfig(dict):
    """``config.json`` as a dict whose missing fields raise :class:`CheckpointError` naming the file and field.

    Why a dict: every family's ``parse_config`` reads ``cfg["field"]``; a
    missing field there would be a bare ``KeyError: 'num_attention_heads'``
    with no file named. ``get`` and ``in`` behave as for a plain dict.
    """

    def __init__(self, data: dict[str, Any], path: str | Path) -> None:
        super().__init__(data)
        self.path = str(path)

    def __missing__(self, key: str) -> Any:
        raise CheckpointError(
            f"{self.path} has no field {key!r}, which this architecture ({(self.get('architectures') or ['?'])[0]}) "
            "needs; the config.json is incomplete: re-save it with the model's save_pretrained (or add the field)"
        )

    def __reduce__(self):  # keep the file name when sent to a worker
        return (ModelConfig, (dict(self), self.path))


def _load_json(path: Path, what: str) -> Any:
    """Parse a JSON file; a syntax error names the file, the line and the column."""
    try:
        text = path.read_text()
    except OSError as err:
        raise CheckpointError(f"cannot read {what} {path} ({err.strerror}); check the file and its permissions") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "fix the file or re-save the checkpoint with save_pretrained"
        ) from None


def _check_config_fields(cfg: dict[str, Any], path: Path) -> None:
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{path}: field 'architectures' is {archs!r}; it must be a list of class names, "
                              "e.g. [\"MixtralForCausalLM\"]")
    for name in _POSITIVE_INT_FIELDS + _NON_NEGATIVE_INT_FIELDS:
        if name not in cfg or (cfg[name] is None and name in _OPTIONAL_FIELDS):
            continue
        value = cfg[name]
        least = 1 if name in _POSITIVE_INT_FIELDS else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CheckpointError(
                f"{path}: field {name!r} is {value!r}, but it must be an integer >= {least}; "
                "the config.json is damaged or was edited by hand: restore it from the checkpoint's source"
            )


def read_config(model_dir: str | Path) -> ModelConfig:
    """``config.json`` of a Hugging Face checkpoint; unreadable JSON, wrong field types and (later) missing
    fields raise :class:`CheckpointError` naming the file and the field."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found; pass the directory of a Hugging Face checkpoint (config.json + *.safetensors)"
        )
    data = _load_json(path, "model config")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object of config fields")
    _check_config_fields(data, path)
    return ModelConfig(data, path)


def inside(root: Path, entry: str, what: str) -> Path:
    """``root / entry`` when it stays inside ``root`` (symlinks resolved); a CheckpointError otherwise.

    Why: an index is data from whoever published the checkpoint; an entry like
    ``../outside.safetensors`` or an absolute path must not make tessera read
    files outside the model directory.
    """
    if not isinstance(entry, str) or not entry or "\x00" in entry:
        raise CheckpointError(f"{what} names the file {entry!r}; it must be a file name inside {root}")
    candidate = Path(entry)
    base = root.resolve()
    resolved = (root / candidate).resolve()
    if candidate.is_absolute() or (resolved != base and base not in resolved.parents):
        raise CheckpointError(
            f"{what} names {entry!r}, which lies outside the model directory {root}; tessera reads weights only "
            "from inside it: fix the index (entries are file names such as model-00001-of-00002.safetensors)"
        )
    return root / candidate


def open_safetensors(path: Path):
    """``safe_open`` with errors that name the file: a truncated or corrupt file is a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), "pt")
    except SafetensorError as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: download or save it "
            "again (compare its size with the source)"
        ) from None
    except OSError as err:
        raise CheckpointError(f"cannot open {path} ({err.strerror}); check the file and its permissions") from None


def weight_files(model_dir: str | Path) -> dict[str, str]:
    """tensor name -> file name, from ``model.safetensors.index.json`` or the single ``model.safetensors``.

    Every file is checked here, on whoever calls it first (the driver): the
    index parses, each entry stays inside the directory and exists, each
    file's safetensors header is complete, and each file holds the tensors the
    index maps to it. Only headers are read.
    """
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        doc = _load_json(index, "checkpoint index")
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"checkpoint index {index} has no 'weight_map' object of tensor name -> file; "
                                  "re-save the checkpoint with save_pretrained")
        files: dict[str, str] = {}
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            inside(root, file, f"checkpoint index {index} (tensor {name!r})")
            files[name] = file
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            path = root / file
            if not path.is_file():
                raise CheckpointError(
                    f"checkpoint index {index} maps {len(names)} tensor(s) (e.g. {names[0]!r}) to {file!r}, which "
                    f"does not exist in {root}; the index is stale or a shard is missing: download the missing shard"
                )
            with open_safetensors(path) as f:
                held = set(f.keys())
            missing = [n for n in names if n not in held]
            if missing:
                raise CheckpointError(
                    f"checkpoint index {index} maps tensor {missing[0]!r} to {path}, which does not hold it "
                    f"({len(missing)} such tensor(s)); the index and the shards do not belong together"
                )
        return files
    single = root / "model.safetensors"
    if single.is_file():
        with open_safetensors(single) as f:
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
        file = self.files.get(name)
        if file is None:
            raise CheckpointError(
                f"tensor {name!r} is missing from the checkpoint in {self.root} "
                f"({len(self.files)} tensors in {', '.join(sorted(set(self.files.values())))}); "
                "the checkpoint does not match its config.json architecture"
            )
        handle = self._handles.get(file)
        if handle is None:
            path = inside(self.root, file, f"the checkpoint index (tensor {name!r})")
            if not path.is_file():
                raise CheckpointError(f"tensor {name!r} is mapped to {path}, which does not exist; the index is stale")
            handle = self._handles[file] = open_safetensors(path)
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
