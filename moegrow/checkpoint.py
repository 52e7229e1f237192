"""Orbax checkpoints: params (plain dicts) + optimizer state + step, data iterator state and
metadata (model config, stage, lineage) as JSON, under `<workdir>/checkpoints/<step>/`; a stage
with EWC adds the item `ewc` ({'fisher', 'anchor'}, params-shaped) to each of its checkpoints.

Restores always name the shapes they expect: `abstract_state` carries shapes, dtypes and the
shardings of the CURRENT mesh, so a checkpoint written on 1 device restores onto 8 and back.
Growth restores at the checkpoint's OWN (old) shapes, read from its stored model config, and
grows in JAX; Orbax is never asked to pad or truncate.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from moegrow.config import ModelConfig
from moegrow.trees import check_tree

STATE, META, DATA, EWC = "state", "meta", "data", "ewc"
_STEP_DIR = re.compile(r"(?:stage(\d+)_)?(\d+)")


def stage_prefix(stage: int) -> str | None:
  """Step-directory prefix of a stage's checkpoints: stage 0 `<step>`, stage i `stage<i>_<step>`."""
  return None if stage == 0 else f"stage{int(stage)}"


def step_name(stage: int, step: int) -> str:
  """Directory name of a stage's checkpoint at `step` (inverse of `parse_step_dir`)."""
  prefix = stage_prefix(stage)
  return f"{prefix}_{int(step)}" if prefix else str(int(step))


def parse_step_dir(name: str) -> tuple[int, int] | None:
  """'stage2_300' -> (2, 300), '300' -> (0, 300); None for any other name."""
  m = _STEP_DIR.fullmatch(name)
  return None if m is None else (int(m.group(1) or 0), int(m.group(2)))


def manager(directory: str, keep: int = 3, async_save: bool = True, save_interval: int = 1,
            read_only: bool = False, step_prefix: str | None = None) -> ocp.CheckpointManager:
  """Checkpoints `<directory>/<step>` (or `<directory>/<step_prefix>_<step>`)."""
  handlers = {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler(),
              DATA: ocp.JsonCheckpointHandler(), EWC: ocp.StandardCheckpointHandler()}
  level = logging.get_verbosity()
  if read_only:  # Orbax warns that a read-only manager is read-only
    logging.set_verbosity(logging.ERROR)
  try:
    options = ocp.CheckpointManagerOptions(
        step_prefix=step_prefix, max_to_keep=None if read_only else keep, create=not read_only,
        read_only=read_only, enable_async_checkpointing=async_save and not read_only,
        save_interval_steps=save_interval)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)
  finally:
    logging.set_verbosity(level)


def free_bytes(path: str) -> int:
  """Free space on the file system holding `path` (its nearest existing parent)."""
  while not os.path.exists(path):
    path = os.path.dirname(path) or "."
  return shutil.disk_usage(path).free


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def save(mngr: ocp.CheckpointManager, step: int, state: dict, meta: dict, data_state: Any = None,
         force: bool = True, ewc: dict | None = None) -> bool:
  """Save (asynchronously if the manager is async). `meta` must be JSON-serialisable; `ewc`
  (optional) is saved as its own item. A disk without room for the state, or any failed write,
  is an OSError naming the path and the free space, raised here at the first save that cannot
  succeed."""
  where = step_dir(mngr, step)
  need = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves((state, ewc)) if hasattr(x, "dtype"))
  need //= max(jax.process_count(), 1)  # each process writes its own shards
  free = free_bytes(str(mngr.directory))
  if free < need * 1.05 + 2**20:
    raise OSError(f"cannot write checkpoint {where}: it needs about {_gib(need)}, {_gib(free)} free on "
                  f"{mngr.directory}; free some space and rerun (the run resumes from its newest checkpoint)")
  args = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta),
          DATA: ocp.args.JsonSave({"iterator": data_state})}
  if ewc is not None:
    args[EWC] = ocp.args.StandardSave(ewc)
  try:
    return mngr.save(int(step), args=ocp.args.Composite(**args), force=force)
  except Exception as e:  # noqa: BLE001 - re-raised with the path and the free space
    raise OSError(f"cannot write checkpoint {where} ({type(e).__name__}: {str(e)[:300]}); "
                  f"{_gib(free_bytes(str(mngr.directory)))} free on {mngr.directory}") from e


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  try:
    out = mngr.restore(int(step), args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
  except Exception as e:  # noqa: BLE001 - re-raised with the path
    raise ValueError(f"checkpoint {step_dir(mngr, step)}: cannot read its metadata ({type(e).__name__}: {e})") from e
  meta = out[META]
  where = step_dir(mngr, step)
  if not isinstance(meta, dict) or "model" not in meta:
    raise ValueError(f"checkpoint {where}: metadata has no model config; not a moegrow checkpoint")
  check_meta(meta, where, _stored_shapes(mngr, step))
  return meta


def check_meta(meta: dict, where: str, stored=None) -> ModelConfig:
  """Validate checkpoint metadata before anything is built from it: types and ranges (through
  ModelConfig) and, when the stored arrays' shapes are known, the sizes they actually hold."""
  if not isinstance(meta.get("model"), dict):
    raise ValueError(f"checkpoint {where}: metadata field 'model' must be a dict, got {type(meta.get('model')).__name__}")
  if not isinstance(meta.get("stage", 0), int) or meta.get("stage", 0) < 0:
    raise ValueError(f"checkpoint {where}: metadata field 'stage'={meta.get('stage')!r} must be an integer >= 0")
  if not isinstance(meta.get("lineage", []), list):
    raise ValueError(f"checkpoint {where}: metadata field 'lineage' must be a list")
  try:
    cfg = ModelConfig.from_dict(meta["model"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"checkpoint {where}: metadata field 'model' is invalid: {e}") from e
  if stored is not None:
    shapes = {k: tuple(v.shape) for k, v in _by_path(stored).items()}
    blocks = {k.split("/")[2] for k in shapes if k.startswith("params/blocks/")}
    embed = shapes.get("params/embed_VD")
    problems = []
    if len(blocks) != cfg.num_layers:
      problems.append(f"num_layers={cfg.num_layers} but the checkpoint holds {len(blocks)} blocks")
    if embed is not None and embed != (cfg.vocab_size, cfg.d_model):
      problems.append(f"vocab_size={cfg.vocab_size}, d_model={cfg.d_model} but embed_VD is {embed}")
    if problems:
      raise ValueError(f"checkpoint {where}: metadata does not match the stored arrays: {'; '.join(problems)}")
  return cfg


def model_config(meta: dict) -> ModelConfig:
  return ModelConfig.from_dict(meta["model"])


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict) -> tuple[dict, dict, Any]:
  """(state, meta, data_iterator_state) at `step`, at exactly the shapes/shardings of
  `abstract_state` (a tree of jax.ShapeDtypeStruct with shardings)."""
  where = step_dir(mngr, step)
  stored = _stored_shapes(mngr, step)
  if stored is not None:
    _check_shapes(stored, abstract_state, where)
  try:
    out = mngr.restore(int(step), args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore(),
        DATA: ocp.args.JsonRestore()}))
  except Exception as e:  # noqa: BLE001 - re-raised with the path
    raise ValueError(f"checkpoint {where}: restore failed ({type(e).__name__}: {e})") from e
  return out[STATE], out[META], (out[DATA] or {}).get("iterator")


def has_item(mngr: ocp.CheckpointManager, step: int, item: str) -> bool:
  return os.path.isdir(os.path.join(step_dir(mngr, step), item))


def restore_item(mngr: ocp.CheckpointManager, step: int, item: str, abstract: Any) -> Any:
  """One array item (e.g. `ewc`) at the shapes/shardings of `abstract`; ValueError naming the
  checkpoint and the item when it is missing or does not match."""
  where = step_dir(mngr, step)
  if not has_item(mngr, step, item):
    raise ValueError(f"checkpoint {where} has no '{item}' item")
  try:
    stored = mngr.item_metadata(int(step))[item]
  except Exception:  # noqa: BLE001 - metadata is advisory; restore reports real errors
    stored = None
  if stored is not None:
    check_tree(_by_path(stored), _by_path(abstract), f"checkpoint {where} item '{item}'", check_dtype=False)
  try:
    return mngr.restore(int(step), args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))[item]
  except Exception as e:  # noqa: BLE001 - re-raised with the path
    raise ValueError(f"checkpoint {where}: restoring item '{item}' failed ({type(e).__name__}: {e})") from e


def _stored_shapes(mngr, step):
  try:
    meta = mngr.item_metadata(int(step))
    tree = meta[STATE] if meta is not None else None
  except Exception:  # noqa: BLE001 - metadata is advisory; restore reports real errors
    return None
  if tree is None:
    return None
  return tree


def _check_shapes(stored, abstract, where):
  """Refuse any shape or structure mismatch, naming the paths (no silent padding)."""
  check_tree(_by_path(stored), _by_path(abstract), f"checkpoint {where}", check_dtype=False)


def _by_path(tree) -> dict[str, Any]:
  """'/'-joined path -> leaf, for trees of arrays, ShapeDtypeStructs or Orbax metadata."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
  return {jax.tree_util.keystr(p, simple=True, separator="/"): v for p, v in leaves}


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  prefix = mngr._options.step_prefix  # noqa: SLF001 - the manager's own naming
  return os.path.join(str(mngr.directory), f"{prefix}_{int(step)}" if prefix else str(int(step)))


def locate(path: str) -> tuple[str, str | None, int]:
  """A run's workdir, its checkpoints directory, or one step's directory -> (checkpoints
  directory, step prefix or None, step). Without a step directory: the newest checkpoint."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"checkpoint path {path} is a file; give a run's workdir, its checkpoints directory or "
                     f"one step's directory")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  parsed = parse_step_dir(os.path.basename(path.rstrip("/")))
  if parsed:
    if not os.path.isdir(os.path.join(path, STATE)):
      raise ValueError(f"checkpoint {path} has no '{STATE}' item: incomplete or not a moegrow checkpoint")
    return os.path.dirname(path), stage_prefix(parsed[0]), parsed[1]
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  found = [(step, stage) for stage, step in filter(None, map(parse_step_dir, os.listdir(path)))]
  if not found:
    raise FileNotFoundError(f"no checkpoint in {path}")
  step, stage = max(found)
  return path, stage_prefix(stage), step


def seed_workdir(src_step_dir: str, workdir: str, step: int) -> bool:
  """Start a fresh run in `workdir` from a copy of one checkpoint (a step directory), as that
  run's stage-0 checkpoint `step`: the whole directory is copied, then one rename, so a crash
  leaves no half-seeded workdir. A workdir that already has checkpoints is left alone (it
  resumes from its newest one). The source is only read. Returns whether it copied."""
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    return False
  if not os.path.isdir(os.path.join(src_step_dir, STATE)):
    raise FileNotFoundError(f"checkpoint {src_step_dir} is missing or incomplete; cannot start {workdir}")
  tmp = os.path.join(workdir, ".seeding")
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src_step_dir, os.path.join(tmp, step_name(0, step)))
  os.replace(tmp, os.path.join(workdir, "checkpoints"))
  return True


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (tmp + rename), for small side files like growth certificates."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
