"""Read a local diffusers-format pipeline directory without diffusers' model classes.

Why our own reader: a rank must build *its* transformer (tessera's modules,
maybe tensor-sharded) and read only the tensors and slices it needs, straight
from the safetensors files (memory-mapped, sliced), whether the checkpoint is
one file or sharded with an index. Schedulers, the VAE and the text encoders
are not re-implemented: they are loaded with diffusers / transformers from
their sub-folders (``load_component``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Callable, Iterable, Mapping

import torch

from tessera.errors import ConfigError
from tessera.models import flux, pixart, sd3
from tessera.models.checkpoint import CheckpointError, inside, open_safetensors

# The family registry: tessera family name -> its family file (the contract is models/dit_family.py).
# Adding a family is one file in models/ and one entry here.
FAMILIES: Mapping[str, ModuleType] = MappingProxyType({m.NAME: m for m in (pixart, sd3, flux)})
# diffusers `_class_name` of transformer/config.json -> family name, from each family's DIFFUSERS_CLASSES.
TRANSFORMER_CLASSES: Mapping[str, str] = MappingProxyType(
    {cls: m.NAME for m in FAMILIES.values() for cls in m.DIFFUSERS_CLASSES})
# Generic classes diffusers itself remaps by a config key (diffusers' _CLASS_REMAPPING_DICT): PixArt-Sigma
# ships `Transformer2DModel` with norm_type "ada_norm_single"; "ada_norm_zero" (class-conditioned DiT) is not run.
GENERIC_CLASSES: Mapping[str, tuple[str, Mapping[str, str]]] = MappingProxyType(
    {"Transformer2DModel": ("norm_type", {"ada_norm_single": "PixArtTransformer2DModel"})})
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# The config file each component's own library reads from its sub-folder; checked at open so that a
# pipeline missing one fails at load, naming the file, instead of failing every request later.
COMPONENT_CONFIGS = {"vae": "config.json", "scheduler": "scheduler_config.json", "text_encoder": "config.json",
                     "text_encoder_2": "config.json", "text_encoder_3": "config.json"}


@dataclass(frozen=True)
class Pieces:
    """A slicer answer for a tensor read as several slices joined along ``dim``.

    safetensors reads one contiguous range per dim; a row-split linear whose
    input is ``[attention heads | MLP columns]`` needs two ranges of columns.
    """

    dim: int
    parts: tuple[tuple[slice, ...], ...]


class ModelDirError(ConfigError):
    """The directory is not a usable diffusers pipeline; the message says what is missing."""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a missing file, a syntax error or a non-object names the file."""
    if not path.is_file():
        raise ModelDirError(f"{path} is missing; the {what} needs it (copy it from the pipeline's source)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                            f"fix or restore the {what}") from None
    except OSError as err:
        raise ModelDirError(f"cannot read {path} ({err.strerror}); check the file and its permissions") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{path} holds a JSON {type(data).__name__}, not an object; restore the {what}")
    return data


@dataclass(frozen=True)
class DiffusersDir:
    """What ``model_index.json`` and ``transformer/config.json`` say about a pipeline directory."""

    path: Path
    pipeline_class: str
    family: str
    components: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    transformer_config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "DiffusersDir":
        path = Path(path).expanduser()
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelDirError(
                f"{path} has no model_index.json, so it is not a diffusers pipeline directory; pass the folder that "
                "holds model_index.json, transformer/, scheduler/ and vae/ (or build one with "
                "tessera.models.tiny_diffusion.build_tiny_diffusion)"
            )
        meta = _read_json(index, "pipeline index")
        components = {k: tuple(v) for k, v in meta.items()
                      if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0]}
        for needed in ("transformer", "scheduler", "vae"):
            if needed not in components:
                raise ModelDirError(f"{index} lists no {needed!r} component; tessera needs transformer, scheduler and vae")
        for name in components:  # a component is a sub-folder: its name may not climb out of the pipeline
            try:
                inside(path, name, f"{index} (component {name!r})")
            except CheckpointError as err:
                raise ModelDirError(str(err)) from None
        cfg_file = path / "transformer" / "config.json"
        if not cfg_file.is_file():
            raise ModelDirError(f"{cfg_file} is missing; the transformer sub-folder needs its config.json")
        cfg = _read_json(cfg_file, "transformer config")
        family = family_of({"_class_name": components["transformer"][1], **cfg}).NAME
        opened = cls(path, meta.get("_class_name", "?"), family, components, cfg)
        opened.check_components(require_folders=False)
        opened.check_weights()
        return opened

    def check_components(self, require_folders: bool = True) -> None:
        """Each component's config file (vae/config.json, scheduler/scheduler_config.json, text encoders) exists
        and parses, so a pipeline missing one fails at load, naming the file, not at its first request.

        ``require_folders=False`` (what :meth:`open` does) skips components whose whole folder is absent, so a
        transformer-only directory still opens; the engine requires them all.
        """
        for name, file in COMPONENT_CONFIGS.items():
            if name not in self.components or (not require_folders and not (self.path / name).is_dir()):
                continue
            data = _read_json(self.path / name / file, f"{name} component")
            if name == "vae" and not isinstance(data.get("block_out_channels", [1]), list):
                raise ModelDirError(f"{self.path / name / file}: block_out_channels is "
                                    f"{data['block_out_channels']!r}; it must be a list of channel counts")

    @property
    def module(self) -> ModuleType:
        """The family file (``models/<family>.py``) of this pipeline's transformer."""
        return FAMILIES[self.family]

    # -- transformer weights -----------------------------------------------------------

    def weight_files(self) -> dict[str, Path]:
        """Tensor name -> safetensors file holding it (single file or sharded with an index).

        Index entries must stay inside ``transformer/`` and exist; every file's
        header must be complete (truncated files fail here, naming the file).
        """
        folder = self.path / "transformer"
        index = folder / WEIGHTS_INDEX
        if index.is_file():
            doc = _read_json(index, "transformer weight index")
            weight_map = doc.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelDirError(f"{index} has no 'weight_map' object of tensor name -> file; re-save the pipeline")
            out: dict[str, Path] = {}
            for name, fname in weight_map.items():
                try:
                    out[name] = inside(folder, fname, f"{index} (tensor {name!r})")
                except CheckpointError as err:
                    raise ModelDirError(str(err)) from None
            for file in sorted(set(out.values())):
                if not file.is_file():
                    raise ModelDirError(f"{index} maps tensors to {file.name!r}, which does not exist in {folder}; "
                                        "the index is stale or a shard is missing: download the missing shard")
                self._header(file)
            return out
        single = folder / WEIGHTS
        if not single.is_file():
            raise ModelDirError(f"{folder} holds neither {WEIGHTS} nor {WEIGHTS_INDEX}; tessera reads safetensors only")
        return {name: single for name in self._header(single)}

    @staticmethod
    def _header(file: Path) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape from a safetensors header (a truncated or corrupt file names itself)."""
        try:
            with open_safetensors(file) as f:
                return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except CheckpointError as err:
            raise ModelDirError(str(err)) from None

    def check_weights(self) -> None:
        """Every tensor the transformer needs is on disk with the shape its config implies (headers only).

        :meth:`open` runs it (the model is built on the meta device: no memory), so on the driver a config that does not match its weights fails at
        load, naming the tensor and the file, before any worker reads a byte.
        """
        model = _build_checked(self.family, self.transformer_config, self.path / "transformer" / "config.json")
        files = self.weight_files()
        shapes: dict[Path, dict[str, tuple[int, ...]]] = {}
        for name, param in model.state_dict().items():
            if name not in files:
                raise ModelDirError(f"tensor {name!r} is not in {self.path / 'transformer'}; the checkpoint does not "
                                    "match its config (was it saved by a different model class?)")
            file = files[name]
            if file not in shapes:
                shapes[file] = self._header(file)
            if name not in shapes[file]:
                raise ModelDirError(f"the weight index maps tensor {name!r} to {file}, which does not hold it; the "
                                    "index and the shards do not belong together")
            if shapes[file][name] != tuple(param.shape):
                raise ModelDirError(f"tensor {name!r} in {file} has shape {list(shapes[file][name])} but "
                                    f"{self.path / 'transformer' / 'config.json'} implies {list(param.shape)}; the "
                                    "config and the weights disagree")

    def read_tensors(self, names: Iterable[str],
                     slicer: Callable[[str, tuple[int, ...]], tuple | Pieces | None] | None = None,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read ``names`` from their files; ``slicer(name, shape)`` may return a tuple of slices (or
        :class:`Pieces`) to read only part."""
        from safetensors import safe_open

        files = self.weight_files()
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in files:
                raise ModelDirError(f"tensor {name!r} is not in {self.path / 'transformer'}; the checkpoint does not "
                                    "match its config (was it saved by a different model class?)")
            by_file.setdefault(files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as err:  # noqa: BLE001 - SafetensorError or OSError: name the file
                raise ModelDirError(f"{file} is not a readable safetensors file ({err}); it is truncated or "
                                    "corrupt: download or save it again") from None
            with handle as f:
                for name in file_names:
                    part = f.get_slice(name)
                    index = slicer(name, tuple(part.get_shape())) if slicer else None
                    if isinstance(index, Pieces):
                        tensor = torch.cat([part[p] for p in index.parts], dim=index.dim)
                    else:
                        tensor = part[index] if index is not None else part[:]
                    out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return out

    # -- everything else comes from diffusers / transformers ------------------------------

    def load_component(self, name: str, **kwargs: Any) -> Any:
        """Load ``scheduler``, ``vae``, ``text_encoder*`` or ``tokenizer*`` with its own library."""
        if name not in self.components:
            raise ModelDirError(f"component {name!r} is not in {self.path / 'model_index.json'}")
        library, cls_name = self.components[name]
        if library not in ("diffusers", "transformers"):
            raise ModelDirError(f"component {name!r} comes from library {library!r}; only diffusers/transformers load")
        module = __import__(library, fromlist=[cls_name])
        cls = getattr(module, cls_name, None)
        if cls is None and name.startswith("tokenizer"):
            cls = getattr(module, "AutoTokenizer")
        if cls is None:
            raise ModelDirError(f"{library} has no class {cls_name!r} (component {name!r}); upgrade {library}")
        return cls.from_pretrained(str(self.path / name), **kwargs)


def _build_checked(family: str, config: Mapping[str, Any], cfg_file: Path):
    """The module on the meta device; a config with a wrong field fails here, naming the file."""
    try:
        return build_transformer(family, config)
    except ModelDirError:
        raise
    except (TypeError, ValueError, KeyError, ZeroDivisionError, RuntimeError) as err:
        raise ModelDirError(f"{cfg_file} does not describe a buildable {family} transformer "
                            f"({type(err).__name__}: {err}); fix the field it names or restore the config") from None


def family_of(config: Mapping[str, Any]) -> ModuleType:
    """The family file for a ``transformer/config.json`` (by its ``_class_name``), or an error naming the
    supported classes."""
    cls_name = config.get("_class_name")
    if cls_name in GENERIC_CLASSES:
        key, remap = GENERIC_CLASSES[cls_name]
        cls_name = remap.get(config.get(key), f"{cls_name} with {key}={config.get(key)!r}")
    family = TRANSFORMER_CLASSES.get(cls_name)
    if family is None:
        raise ModelDirError(
            f"transformer class {cls_name!r} is not supported; tessera runs {', '.join(sorted(TRANSFORMER_CLASSES))} "
            "(and diffusers' generic Transformer2DModel with norm_type 'ada_norm_single', as PixArt-Sigma ships it)"
        )
    return FAMILIES[family]


def build_transformer(family: str, config: Mapping[str, Any]):
    """tessera's module for ``family`` built on the meta device (no memory until weights arrive)."""
    if family not in FAMILIES:
        raise ModelDirError(f"unknown family {family!r}; tessera runs {', '.join(FAMILIES)}")
    with torch.device("meta"):
        return FAMILIES[family].build(config)


def load_transformer(model_dir: DiffusersDir, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     prepare: Callable[[torch.nn.Module], Callable | None] | None = None,
                     report: dict | None = None) -> torch.nn.Module:
    """Build the family's module and fill it from safetensors.

    ``prepare(module)`` may reshape the module first (tensor parallel swaps in
    sharded linears, pipeline stages drop other stages' blocks) and return a
    ``slicer`` so that only this rank's slices are read from disk. ``report``
    (a dict) receives ``bytes_read`` and ``tensors_read``: what this rank took
    from the files, which tests compare with the checkpoint's total.
    """
    model = build_transformer(model_dir.family, model_dir.transformer_config)
    slicer = prepare(model) if prepare is not None else None
    wanted = dict(model.state_dict())
    tensors = model_dir.read_tensors(wanted.keys(), slicer=slicer, dtype=dtype)
    if report is not None:
        report["bytes_read"] = sum(t.numel() * t.element_size() for t in tensors.values())
        report["tensors_read"] = len(tensors)
    for name, meta in wanted.items():
        if tuple(tensors[name].shape) != tuple(meta.shape):
            raise ModelDirError(f"tensor {name!r} has shape {tuple(tensors[name].shape)} on disk but the model expects "
                                f"{tuple(meta.shape)}; the config and the weights disagree")
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, assign=True)
    return model.to(device).eval().requires_grad_(False)
