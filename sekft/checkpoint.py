"""Find a base checkpoint folder and read its files, with errors that say what to fix.

A BASE argument is a local folder, or a hub id `org/name` already in the Hugging Face cache
(never downloaded). Weights are safetensors only: `model.safetensors`, or shards listed in
`model.safetensors.index.json`. Tensors are read one at a time through safetensors' memory
map (see `read_tensor`). The tokenizer files and the chat template are read by
`sekft.tokenizer` and `sekft.template` from the same folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sekft.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def hf_cache_dir() -> Path:
    """The hub cache where huggingface_hub puts it: $HF_HUB_CACHE (or its older name
    $HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _cached_snapshot(repo_id: str, cache: Path) -> Path | None:
    """The snapshot `refs/main` points at, else the only snapshot present, else None.

    Several snapshots and no `refs/main` (a cache filled by revision) is a CheckpointError
    listing them: picking one would train on a revision nobody chose.
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = snapshots / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    if snapshots.is_dir():
        found = sorted(p for p in snapshots.iterdir() if p.is_dir())
        if len(found) == 1:
            return found[0]
        if found:
            raise CheckpointError(
                f"base {repo_id!r}: {snapshots} holds {len(found)} revisions and no refs/main; "
                f"pass one as a folder: {', '.join(str(p) for p in found[:3])}"
            )
    return None


def resolve_base(base: str) -> Path:
    """A checkpoint folder for BASE: an existing local folder, or `org/name` in the HF cache."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"base {base!r} is a file; pass the checkpoint folder holding config.json"
        )
    parts = base.split("/")
    if len(parts) == 2 and all(parts):
        cache = hf_cache_dir()
        snapshot = _cached_snapshot(base, cache)
        if snapshot is not None:
            return snapshot
        where = cache / ("models--" + base.replace("/", "--"))
        raise CheckpointError(
            f"base {base!r}: no such folder, and not in the Hugging Face cache (looked in "
            f"{where}); sekft never downloads: fetch it first (e.g. `hf download {base}`) "
            "or pass a local folder"
        )
    raise CheckpointError(
        f"base {base!r}: no such folder; pass a checkpoint folder or an org/name hub id"
    )


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a CheckpointError naming the file, line and problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(folder: Path) -> dict:
    """`config.json` of a checkpoint folder as a dict."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder / 'config.json'}: missing; a base is a folder with config.json and "
            "safetensors weights"
        )
    return read_json(folder / "config.json")


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the shard index or the single file."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' object naming the shards")
        files = {}
        for name, shard in weight_map.items():
            shard_path = folder / shard
            if not shard_path.is_file():
                raise CheckpointError(
                    f"{index_path}: shard {shard!r} (holding {name!r}) is missing from {folder}; "
                    "re-download the checkpoint"
                )
            files[name] = shard_path
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _file_tensor_names(single)}
    hint = (
        " (.bin/.pt weights are not supported: convert them to safetensors)"
        if any(folder.glob("*.bin"))
        else ""
    )
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _file_tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise _corrupt(path, e) from None


def _corrupt(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a readable safetensors file ({error}); it is corrupt or truncated, "
        "re-download it"
    )


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is, read from the safetensors header."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def tensor_index(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint with its file, dtype and shape (headers only, no data).

    A file whose header is unreadable, or whose data section is shorter than its header
    claims (a truncated download), is a CheckpointError naming the file.
    """
    by_file: dict[Path, list[str]] = {}
    for name, path in weight_files(folder).items():
        by_file.setdefault(path, []).append(name)
    index = {}
    for path, names in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(
                            f"{folder / INDEX_FILE}: {name!r} is mapped to {path.name}, "
                            "which does not contain it; re-download the checkpoint"
                        )
                    view = f.get_slice(name)
                    dtype = _DTYPES.get(view.get_dtype())
                    if dtype is None:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has unsupported dtype {view.get_dtype()}"
                        )
                    index[name] = TensorInfo(name, path, dtype, tuple(view.get_shape()))
        except (SafetensorError, OSError) as e:
            raise _corrupt(path, e) from None
    return index


def stored_dtype(index: dict[str, TensorInfo]) -> torch.dtype:
    """The floating-point dtype a checkpoint's weights are stored in (see `tensor_index`).

    The one dtype of its floating-point tensors; when they mix dtypes, float32 (float64 if
    any is), which holds every stored value exactly.
    """
    floats = {info.dtype for info in index.values() if info.dtype.is_floating_point}
    if len(floats) == 1:
        return next(iter(floats))
    return torch.float64 if torch.float64 in floats else torch.float32


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """The stored tensor, as a CPU tensor backed by the file's memory map (no copy yet).

    The file is opened for this one tensor: safetensors keeps a file's pages mapped while
    any handle or tensor of it lives, so opening per tensor lets a converted or quantized
    tensor's source pages go as soon as it is done (peak memory: one tensor, not one shard).
    Pages are copy-on-write: writing to the tensor never changes the file.
    """
    try:
        with safe_open(info.file, framework="pt") as f:
            return f.get_tensor(info.name)
    except (SafetensorError, OSError) as e:
        raise _corrupt(info.file, e) from None
