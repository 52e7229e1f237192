"""Sharded safetensors checkpoints: read tensor by tensor, write shards + index atomically.

Reading and writing go through the `safetensors` library's flax API on the host CPU (its numpy
API has no bfloat16): tensors come back as numpy arrays in their stored dtype (ml_dtypes
bfloat16 included), one at a time, so a large checkpoint is never held whole in memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterable, Iterator

import jax
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def read_json(path: str) -> dict:
  """A JSON file of a model directory; a parse error names the file."""
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not a text file: {e}") from e


def inside(directory: str, name: str) -> str:
  """The path of file `name` listed by a model directory's own files, refused when it resolves
  outside the directory (`../x`, an absolute path, or a link that leads out)."""
  root = os.path.realpath(directory)
  path = os.path.realpath(os.path.join(root, name)) if isinstance(name, str) else ""
  if not path or os.path.commonpath([root, path]) != root:
    raise ValueError(f"{os.path.join(directory, INDEX)} names the file {name!r}, which is outside {directory}; "
                     f"refusing to read it")
  return path


def _safe_open(path: str):
  try:
    return safe_open(path, framework="flax")
  except Exception as e:  # noqa: BLE001 - re-raised naming the file
    raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def _on_host():
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    yield


class Reader:
  """The tensors of an HF model directory: `model.safetensors`, or the shards listed in
  `model.safetensors.index.json` (every listed shard must exist)."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no 'weight_map' dict (tensor name -> shard file)")
      self.file_of = dict(weight_map)
      for fn in set(self.file_of.values()):
        inside(directory, fn)
      missing = sorted({fn for fn in self.file_of.values() if not os.path.exists(os.path.join(directory, fn))})
      if missing:
        raise FileNotFoundError(f"{index} lists shard file(s) that do not exist: "
                                f"{[os.path.join(directory, m) for m in missing]}")
    elif os.path.exists(os.path.join(directory, SINGLE)):
      with _safe_open(os.path.join(directory, SINGLE)) as f:
        self.file_of = {k: SINGLE for k in f.keys()}
    else:
      raise FileNotFoundError(f"{directory}: no {SINGLE} and no {INDEX}")
    self._open: dict[str, object] = {}

  def names(self) -> set[str]:
    return set(self.file_of)

  def path(self, name: str) -> str:
    return inside(self.directory, self.file_of[name])

  def get(self, name: str) -> np.ndarray:
    """One tensor, as a host numpy array in its stored dtype."""
    with _on_host():
      return np.asarray(self._handle(name).get_tensor(name))

  def _handle(self, name: str):
    fn = self.file_of[name]
    if fn not in self._open:
      self._open[fn] = _safe_open(inside(self.directory, fn)).__enter__()
    return self._open[fn]

  def close(self) -> None:
    for h in self._open.values():
      h.__exit__(None, None, None)
    self._open.clear()


def write(directory: str, config: dict, tensors: Iterable[tuple[str, np.ndarray]], *,
          max_shard_bytes: int = 5 * 2**30, extra_files: Iterable[str] = ()) -> list[str]:
  """Write `config.json`, the tensors in shards of at most `max_shard_bytes` (one shard:
  `model.safetensors`; more: `model-0000k-of-0000n.safetensors` + the index) and copies of
  `extra_files` into `directory`, which must not exist yet. Everything is written into a
  temporary sibling directory first and renamed at the end: a failure leaves nothing behind.
  Returns the tensor files written."""
  if os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f"{directory} already exists and is not empty; export into a new directory")
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(directory))}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    shards, total = _write_shards(tmp, tensors, max_shard_bytes)
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map = {}
    for (part, keys), final in zip(shards, names):
      os.rename(os.path.join(tmp, part), os.path.join(tmp, final))
      weight_map.update({k: final for k in keys})
    if n > 1:
      with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    for src in extra_files:
      shutil.copy(src, os.path.join(tmp, os.path.basename(src)))
    if os.path.exists(directory):
      os.rmdir(directory)  # empty (checked above)
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return names


def _write_shards(tmp: str, tensors: Iterable[tuple[str, np.ndarray]], max_bytes: int):
  shards, current, size, total, seen = [], {}, 0, 0, set()

  def flush():
    part = f"part-{len(shards)}.safetensors"
    with _on_host():
      save_file({k: jax.numpy.asarray(v) for k, v in current.items()}, os.path.join(tmp, part),
                metadata={"format": "pt"})
    shards.append((part, list(current)))

  for name, x in tensors:
    if name in seen:
      raise ValueError(f"tensor {name} written twice")
    seen.add(name)
    if current and size + x.nbytes > max_bytes:
      flush()
      current, size = {}, 0
    current[name] = x
    size += x.nbytes
    total += x.nbytes
  if current or not shards:
    flush()
  return shards, total


def iter_files(directory: str, names: Iterable[str]) -> Iterator[str]:
  """The files of `names` that exist in `directory`."""
  for n in names:
    if os.path.exists(os.path.join(directory, n)):
      yield os.path.join(directory, n)
