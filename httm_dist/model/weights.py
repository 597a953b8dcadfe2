"""Load VGGT weights (the official checkpoint or our own) from a path or any fsspec URL.

The model is built on the meta device (no memory) and the checkpoint's tensors are assigned
to it one by one, so at most one copy of the weights is ever held: safetensors files are
streamed tensor by tensor from their byte ranges (local, s3://, gs://, ...), ``.pt`` files are
memory-mapped when local. ``hf://org/repo[@revision]/path/file`` is fetched into the Hugging
Face cache with ``huggingface_hub`` (an optional dependency).

Exactly the ``track_head.*`` keys are dropped (this project has no track head); any other
missing, unexpected or mis-shaped key is a ``WeightsMismatchError`` that lists them all.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Optional, Union

import torch

from httm_dist.errors import ConfigError, HttmDistError
from httm_dist.model.config import VGGTConfig, preset_weights
from httm_dist.model.vggt import VGGT
from httm_dist.storage import get_fs, is_local, redact

logger = logging.getLogger(__name__)

DROPPED_PREFIX = "track_head."
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")  # safetensors, or a torch pickle
MAX_HEADER_BYTES = 100 * 2**20
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class WeightsMismatchError(HttmDistError, ValueError):
    """The checkpoint does not fit the architecture; ``str()`` lists every offending key."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = [f"{label} ({len(keys)}): {', '.join(keys)}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                 if keys]
        super().__init__(f"weights {source} do not match the VGGT config; " + "; ".join(parts))


def load_vggt(
    config: Union[VGGTConfig, Mapping[str, Any], str],
    weights: Union[str, os.PathLike, None] = None,
    device: Union[str, torch.device, None] = None,
    storage_options: Optional[Mapping[str, Any]] = None,
) -> VGGT:
    """An eval-mode VGGT on ``device`` (default: CUDA when available, else CPU).

    ``config``: a ``VGGTConfig``, a ``config.json``-style mapping, or a preset name.
    ``weights``: path or fsspec URL of a ``.safetensors`` or ``.pt``/``.pth`` state dict
    (``storage_options`` go to fsspec). None loads the preset's shipped weights if it has
    any, else leaves the model randomly initialised (with a warning: outputs are meaningless).
    """
    if isinstance(config, str):
        weights = weights if weights is not None else preset_weights(config)
        config = VGGTConfig.preset(config)
    elif not isinstance(config, VGGTConfig):
        config = VGGTConfig.from_dict(config)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    if weights is None:
        logger.warning("VGGT built with random weights: its cameras, depth and points are meaningless")
        with device:
            return VGGT(config).eval()

    source = os.fspath(weights)
    with torch.device("meta"):
        model = VGGT(config)  # receives the checkpoint's tensors (assign=True): one per load
    expected = _state_shapes(model)  # this model's own map, not expected_shapes(): no second build
    with _open_checkpoint(source, storage_options or {}) as checkpoint:
        shapes = checkpoint.shapes
        dropped = [k for k in shapes if k.startswith(DROPPED_PREFIX)]
        if dropped:
            logger.info("dropping %d %s* keys from %s: the track head is not implemented",
                        len(dropped), DROPPED_PREFIX, source)
        missing, unexpected, mismatched = _compare_shapes(expected, shapes)
        if missing or unexpected or mismatched:
            raise WeightsMismatchError(source, missing, unexpected, mismatched)
        state = {
            key: t.to(device=device, dtype=torch.float32 if t.is_floating_point() else t.dtype)
            for key, t in checkpoint.tensors(expected)
        }
    model.load_state_dict(state, strict=True, assign=True)
    logger.info("loaded VGGT weights from %s (%d tensors) onto %s", source, len(state), device)
    return model.eval()


def check_weights_file(
    preset: str, source: str, storage_options: Optional[Mapping[str, Any]] = None
) -> Optional[int]:
    """Check, before any scene is touched, that ``source`` is a checkpoint of ``preset``'s
    architecture; returns its number of tensors, ``track_head.*`` included (``None`` when not
    checked here).

    Reads only what that takes: a safetensors header (8 bytes + JSON, local or remote, and the
    file size, so a truncated download is caught too), or a local ``.pt`` memory-mapped.
    ``hf://`` URLs and remote ``.pt`` files would have to be downloaded whole, so they are
    left to the workers' load. Raises :class:`~httm_dist.errors.ConfigError` with one line
    naming the file and what to do: a wrong suffix, an unreadable or truncated file, or keys
    and shapes that do not fit the preset (counts and first examples, not every key).
    """
    shown = redact(source)
    suffix = os.path.splitext(source.split("::")[0].split("?")[0])[1].lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError(
            f"'model.weights' file {shown!r} has the suffix {suffix or '(none)'!r}: use a "
            ".safetensors, .pt or .pth checkpoint (rename the file if it is one)"
        )
    if source.startswith("hf://"):
        return None
    fs, path = get_fs(source, dict(storage_options or {}))
    if suffix != ".safetensors" and not is_local(fs):
        logger.info("weights %s are checked when the workers load them (a remote .pt is read whole)", shown)
        return None
    try:
        with _open_checkpoint(source, storage_options or {}) as checkpoint:
            shapes = checkpoint.shapes
            if isinstance(checkpoint, _SafetensorsStream):
                end = max((e["data_offsets"][1] for e in checkpoint.entries.values()), default=0)
                size = fs.size(path)
                if checkpoint.data_start + end > size:
                    raise ValueError(f"the file is truncated ({size} bytes, its header needs "
                                     f"{checkpoint.data_start + end})")
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader error: the file is not a checkpoint
        first = " ".join(str(exc).split())[:200]
        raise ConfigError(
            f"'model.weights' file {shown!r} is not a readable {suffix} checkpoint "
            f"({type(exc).__name__}: {first}): download it again, or point model.weights at "
            "another copy"
        ) from None
    missing, unexpected, mismatched = _compare_shapes(expected_shapes(VGGTConfig.preset(preset)), shapes)
    if missing or unexpected or mismatched:
        parts = [f"{len(keys)} {label} (e.g. {keys[0]})" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected),
                  ("shape mismatches", mismatched)) if keys]
        raise ConfigError(
            f"'model.weights' file {shown!r} does not fit preset '{preset}': {'; '.join(parts)}: "
            "set model.preset to the architecture these weights were trained for, or point "
            "model.weights at a checkpoint of this preset"
        )
    return len(shapes)


def _state_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of ``model`` and its shape."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=8)
def expected_shapes(config: VGGTConfig) -> Mapping[str, tuple[int, ...]]:
    """Every state-dict key of a VGGT of ``config`` and its shape: what a checkpoint must hold
    (``track_head.*`` aside). Built once per config value (configs are frozen and hashable) on
    the meta device, so no memory; read-only, since it is shared."""
    with torch.device("meta"):
        return MappingProxyType(_state_shapes(VGGT(config)))


def _compare_shapes(
    expected: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, mismatched)`` keys of a checkpoint's ``shapes`` against the
    model's ``expected`` ones, ignoring the dropped ``track_head.*`` keys; each sorted."""
    available = {k: s for k, s in shapes.items() if not k.startswith(DROPPED_PREFIX)}
    missing = sorted(set(expected) - set(available))
    unexpected = sorted(set(available) - set(expected))
    mismatched = sorted(f"{k} {available[k]} != {expected[k]}" for k in set(expected) & set(available)
                        if available[k] != expected[k])
    return missing, unexpected, mismatched


# -- checkpoint readers ------------------------------------------------------------------
class _Checkpoint:
    """Keys and shapes up front (so mismatches fail before any data is read), then tensors."""

    shapes: dict[str, tuple[int, ...]]

    def tensors(self, keys: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Checkpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _SafetensorsStream(_Checkpoint):
    """Reads a safetensors file through any file object: header, then one tensor at a time."""

    def __init__(self, f: Any, source: str) -> None:
        self.f = f
        n = int.from_bytes(f.read(8), "little")
        try:
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
        except ValueError as e:  # includes JSON and UTF-8 decoding errors
            raise ValueError(f"{source} is not a valid safetensors file: {e}") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header
        self.shapes = {k: tuple(e["shape"]) for k, e in header.items()}

    def tensors(self, keys: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
        wanted = sorted(keys, key=lambda k: self.entries[k]["data_offsets"][0])  # sequential reads
        for key in wanted:
            e = self.entries[key]
            begin, end = e["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            self.f.seek(self.data_start + begin)
            if self.f.readinto(memoryview(buf.numpy())) != end - begin:
                raise ValueError(f"safetensors file truncated at tensor {key}")
            dtype = SAFETENSORS_DTYPES[e["dtype"]]
            yield key, buf.view(dtype).reshape(e["shape"])

    def close(self) -> None:
        self.f.close()


class _TorchStateDict(_Checkpoint):
    """A ``torch.save``'d state dict (loaded with ``weights_only=True``)."""

    def __init__(self, state: Any, source: str) -> None:
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{source} does not hold a plain state dict of tensors")
        self.state = dict(state)
        self.shapes = {k: tuple(v.shape) for k, v in self.state.items()}

    def tensors(self, keys: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            yield key, self.state.pop(key)  # release each source tensor once it is placed


def _open_checkpoint(source: str, storage_options: Mapping[str, Any]) -> _Checkpoint:
    if source.startswith("hf://"):
        source = _hf_download(source)
    fs, path = get_fs(source, dict(storage_options))
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"weights {source}: unknown format {suffix!r}; use .safetensors, .pt or .pth")
    try:
        if suffix == ".safetensors":
            return _SafetensorsStream(fs.open(path, "rb"), source)
        if is_local(fs):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with fs.open(path, "rb") as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
        return _TorchStateDict(state, source)
    except FileNotFoundError:
        raise FileNotFoundError(f"VGGT weights not found: {source}") from None


def _hf_download(url: str) -> str:
    """hf://org/repo[@revision]/path/in/repo -> local path in the Hugging Face cache."""
    try:
        from huggingface_hub import hf_hub_download  # optional: the [hf] extra
    except ImportError:
        raise ImportError(
            f"loading {url} needs huggingface_hub (pip install 'httm-dist[hf]'), "
            "or download the file and pass its local path"
        ) from None
    parts = url[len("hf://"):].split("/")
    if len(parts) < 3:
        raise ValueError(f"{url}: expected hf://org/repo[@revision]/path/to/file")
    repo, _, revision = "/".join(parts[:2]).partition("@")
    return hf_hub_download(repo_id=repo, filename="/".join(parts[2:]), revision=revision or None)
