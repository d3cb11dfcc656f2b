"""Lazy checkpoint readers.

A :class:`Checkpoint` knows every tensor's name, shape and dtype from file headers alone and
reads one tensor at a time on request. Supported layouts:

* a Hugging Face ``save_pretrained`` folder: ``model.safetensors``, sharded safetensors with
  ``model.safetensors.index.json``, ``pytorch_model.bin`` or its sharded form with
  ``pytorch_model.bin.index.json`` (any ``*.index.json`` whose ``weight_map`` names the shards);
* a single ``.safetensors``, ``.bin``, ``.pt`` or ``.pth`` state-dict file.

Safetensors reads under 16 MiB (the engine's row blocks) are positioned reads into fresh
buffers; larger ones map just the tensor's bytes copy-on-write. Either way resident memory
holds only the tensors in use, whatever the model's size.
Pickled checkpoints go through ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from taskvec.errors import CheckpointError, OutputError
from taskvec.io.dtypes import SAFETENSORS_CODES, element_size
from taskvec.io.side_files import side_files

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class _TensorFile(Protocol):
    path: Path

    def infos(self) -> dict[str, TensorInfo]: ...

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor: ...

    def metadata(self) -> dict[str, str]: ...


# Reads of at least this many bytes are memory-mapped; smaller ones (the engine's row blocks)
# are copied out of the page cache into a fresh buffer, which then sits in the CPU caches for
# the conversion to the working dtype: for 2 MiB blocks of a 1.1B bf16 model, 0.25 s of CPU per
# model instead of 0.42 s through a map (its page faults and unmapping cost more than the copy).
# Whole large tensors are mapped, so that no second copy of them is held.
_MAP_AT_LEAST = 16 << 20


def _mapped(fd: int, start: int, length: int) -> torch.Tensor:
    """``length`` bytes of the file from ``start``, memory-mapped copy-on-write: the page
    cache's pages themselves, no copy (writing to the tensor copies the page, never the file).
    The mapping lives as long as the tensor."""
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    region = mmap.mmap(fd, length + start - aligned, access=mmap.ACCESS_COPY, offset=aligned)
    return torch.frombuffer(region, dtype=torch.uint8, offset=start - aligned, count=length)


def _check_tiling(path: Path, offsets: dict[str, tuple[int, int]], data_len: int) -> None:
    """Refuse a header whose tensors overlap, leave gaps or do not end with the data: the
    safetensors format has them tile the data bytes exactly, and a damaged header that
    shifts a tensor would otherwise read its neighbour's bytes."""
    pos = 0
    for name, (begin, end) in sorted(offsets.items(), key=lambda item: item[1]):
        if begin != pos:
            what = "overlaps another tensor" if begin < pos else "leaves a gap before it"
            raise CheckpointError(f"{path}: corrupt safetensors header (tensor {name!r} {what})")
        pos = end
    if pos != data_len:
        raise CheckpointError(
            f"{path}: corrupt safetensors file ({data_len - pos} bytes after the last tensor)"
        )


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed eagerly, tensor bytes read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None  # set first: __del__ runs even if the header is refused
        self._lock = threading.Lock()
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise CheckpointError(
                        f"{path}: corrupt safetensors file (shorter than 8 bytes)"
                    )
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{path}: corrupt safetensors file (bad header length)")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(
                f"{path}: corrupt safetensors file (header is not JSON)"
            ) from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")
        self._meta: dict[str, str] = header.pop("__metadata__", None) or {}
        if not isinstance(self._meta, dict) or not all(
            isinstance(v, str) for v in self._meta.values()
        ):  # the format's __metadata__ maps strings to strings
            raise CheckpointError(
                f"{path}: corrupt safetensors header (__metadata__ is not a map of strings)"
            )
        self._data_start = 8 + n
        self._infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        data_len = size - self._data_start
        for name, entry in header.items():
            try:
                dtype = SAFETENSORS_CODES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{path}: corrupt or unsupported header entry for tensor {name!r}"
                ) from None
            info = TensorInfo(name, shape, dtype, path)
            if end - begin != info.nbytes or begin < 0 or end > data_len:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (tensor {name!r} lies "
                    f"outside the file's {data_len} data bytes)"
                )
            self._infos[name] = info
            self._offsets[name] = (begin, end)
        _check_tiling(path, self._offsets, data_len)

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def metadata(self) -> dict[str, str]:
        return self._meta

    def _descriptor(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        info = self._infos[name]
        begin, end = self._offsets[name]
        shape = info.shape
        if rows is not None:
            row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        if end == begin:
            return torch.empty(shape, dtype=info.dtype)
        fd = self._descriptor()
        if end - begin >= _MAP_AT_LEAST:
            raw = _mapped(fd, self._data_start + begin, end - begin)
            return raw.view(info.dtype).reshape(shape)
        out = torch.empty(end - begin, dtype=torch.uint8)  # not zero-filled, unlike bytearray
        view = memoryview(out.numpy())
        pos, offset = 0, self._data_start + begin
        while pos < len(view):
            got = os.preadv(fd, [view[pos:]], offset + pos)
            if got <= 0:
                raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
            pos += got
        return out.view(info.dtype).reshape(shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class PickleFile:
    """A pickled state dict (``.bin``/``.pt``), memory-mapped by ``torch.load``.

    Files in the legacy (pre-zip, torch < 1.6) format cannot be memory-mapped; they are loaded
    whole, as nothing else can read them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            mmap = zipfile.is_zipfile(path)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # torch raises many kinds for a bad archive
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path}: cannot load as a PyTorch checkpoint ({first})"
            ) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(
                f"{path}: does not hold a state dict (found {type(obj).__name__})"
            )
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if obj and not self._tensors:
            keys = ", ".join(str(k) for k in list(obj)[:5])
            raise CheckpointError(f"{path}: no tensors at the top level of the dict (keys: {keys})")
        self._infos = {
            k: TensorInfo(k, tuple(v.shape), v.dtype, path) for k, v in self._tensors.items()
        }

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def metadata(self) -> dict[str, str]:
        return {}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self._tensors[name]
        return (t if rows is None else t[rows[0] : rows[1]]).clone()


def _open_file(path: Path) -> _TensorFile:
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    return PickleFile(path)


class Checkpoint:
    """A lazily read set of named tensors, possibly spread over several files.

    ``root`` is the folder holding the model (for config and tokenizer files); for a single
    weight file it is that file's folder.
    """

    # True for a view that computes its tensors from other checkpoints (``base + τ``, see
    # :mod:`taskvec.model_view`): its tensors are not its files' bytes, so it has no content
    # fingerprint of its own.
    derived = False

    def __init__(self, path: Path, files: list[Path], root: Path) -> None:
        self.path = path
        self.root = root
        self._files: list[_TensorFile] = [_open_file(f) for f in files]
        self._by_name: dict[str, _TensorFile] = {}
        self._infos: dict[str, TensorInfo] = {}
        for tf in self._files:
            for name, info in tf.infos().items():
                if name in self._infos:
                    raise CheckpointError(f"{path}: tensor {name!r} appears in two files")
                self._infos[name] = info
                self._by_name[name] = tf
        if not self._infos:
            raise CheckpointError(f"{path}: holds no tensors")

    # --- header-level queries -------------------------------------------------------------
    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Name -> :class:`TensorInfo`, in file order."""
        return self._infos

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    @property
    def files(self) -> list[Path]:
        """The weight files this checkpoint reads."""
        return [tf.path for tf in self._files]

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the first safetensors file (empty for pickles)."""
        return self._files[0].metadata() if self._files else {}

    @property
    def config(self) -> dict[str, Any] | None:
        """``config.json`` next to the weights, if any."""
        cfg = self.root / "config.json"
        if not cfg.is_file():
            return None
        try:
            data = json.loads(cfg.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg}: unreadable config.json ({e})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{cfg}: corrupt config.json (not a JSON object)")
        return data

    def side_files(self) -> dict[str, Path]:
        """The files of a model folder that go with its weights into an output (config,
        tokenizer, remote code, module folders...): relative path -> file. See
        :mod:`taskvec.io.side_files`; none for a single weight file."""
        return side_files(self.root) if self.path.is_dir() else {}

    # --- data -----------------------------------------------------------------------------
    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor ``name`` (or its rows ``[start, stop)`` along the first axis) in its
        stored dtype, as a fresh CPU tensor."""
        try:
            tf = self._by_name[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None
        return tf.read(name, rows)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"


def check_not_an_input(out: str | os.PathLike[str], inputs: Iterable[Checkpoint]) -> None:
    """Refuse an output path that is, or holds, an input: replacing it (``--overwrite``) would
    delete the input before, or while, it is read."""
    target = Path(out).expanduser().resolve()
    for ckpt in inputs:
        for p in (ckpt.path, *ckpt.files):
            q = Path(p).expanduser().resolve()
            if q == target or target in q.parents:
                raise OutputError(
                    f"{out}: the output would replace the input {ckpt.path}; choose another folder"
                )


def _weight_map(index: Path) -> dict[str, Path]:
    """The ``weight_map`` of an ``*.index.json``: tensor name -> the shard file said to hold it."""
    try:
        data = json.loads(index.read_text())
        weight_map = {str(k): index.parent / v for k, v in data["weight_map"].items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index}: corrupt index (no readable weight_map)") from None
    for f in dict.fromkeys(weight_map.values()):
        if not f.is_file():
            raise CheckpointError(f"{index}: names shard {f.name} which does not exist")
    return weight_map


def _check_weight_map(ckpt: Checkpoint, weight_map: dict[str, Path]) -> None:
    """Refuse an index that maps a tensor to a shard not holding it: the tensor would be
    dropped (or read from a shard the index does not name)."""
    for name, shard in weight_map.items():
        info = ckpt.tensors.get(name)
        if info is None or info.file != shard:
            raise CheckpointError(
                f"{ckpt.path}: the index maps tensor {name!r} to {shard.name}, "
                "which does not hold it"
            )


def resolve_weight_files(path: Path) -> tuple[list[Path], Path, dict[str, Path] | None]:
    """The weight files of a checkpoint path, its root folder and, when it is read through an
    ``*.index.json``, that index's weight map."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name.endswith(".index.json"):
            weight_map = _weight_map(path)
            return list(dict.fromkeys(weight_map.values())), path.parent, weight_map
        if path.suffix not in WEIGHT_SUFFIXES:
            raise CheckpointError(
                f"{path}: not a checkpoint (expected .safetensors, .bin, .pt, .pth or a folder)"
            )
        return [path], path.parent, None
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            weight_map = _weight_map(path / index_name)
            return list(dict.fromkeys(weight_map.values())), path, weight_map
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single], path, None
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return safetensors, path, None
    pickles = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if len(pickles) == 1:
        return pickles, path, None
    raise CheckpointError(f"{path}: no model weights found (no safetensors or pytorch_model.bin)")


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint lazily; only headers are read."""
    p = Path(path).expanduser()
    files, root, weight_map = resolve_weight_files(p)
    ckpt = Checkpoint(p, files, root)
    if weight_map is not None:
        _check_weight_map(ckpt, weight_map)
    return ckpt
