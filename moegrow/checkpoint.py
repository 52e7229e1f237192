"""Orbax checkpoints: params (plain dicts) + optimizer state + step, data iterator state and
metadata (model config, stage, lineage) as JSON, under `<workdir>/checkpoints/<step>/`; a stage
with EWC adds the item `ewc` ({'fisher', 'anchor'}, params-shaped) to each of its checkpoints.

Adapter checkpoints: in a LoRA stage (frozen base, `lora.BASE`-style) the stage's first checkpoint
holds the whole model (the base, with fresh adapters); every later one holds only what trains,
`{'params': {'lora'}, 'opt_state', 'step'}`, and its metadata field `adapters` names the base
(its checkpoint directory, step, lineage hash and a fingerprint of its weights). `restore` joins
the two and refuses a base whose identity differs, naming both. The stage's manager pins the base
so that `keep` never deletes it.

Integrity: every save records a checksum of every array leaf it writes (`moegrow.integrity`) in
the metadata (`integrity`, with `format`); every restore compares the arrays it read and refuses a
mismatch naming the checkpoint and the parameter. Checkpoints written before checksums existed
(no `format` field) restore with a one-line note; one of the current format without them is refused.

Restores always name the shapes they expect: `abstract_state` carries shapes, dtypes and the
shardings of the CURRENT mesh, so a checkpoint written on 1 device restores onto 8 and back.
Growth restores at the checkpoint's OWN (old) shapes, read from its stored model config, and
grows in JAX; Orbax is never asked to pad or truncate.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from moegrow import integrity
from moegrow.config import ModelConfig
from moegrow.params.trees import check_tree, flatten

STATE, META, DATA, EWC = "state", "meta", "data", "ewc"
FORMAT = 2  # metadata format: 2 = array checksums recorded (moegrow 0.6); absent = written before


class CorruptCheckpoint(ValueError):
  """A checkpoint whose arrays are not the ones it recorded (flipped or cut-off bytes); `where` is
  its step directory."""

  def __init__(self, message: str, where: str | None = None):
    super().__init__(message)
    self.where = where
SEEDED_BASE = "base-"  # name prefix of an adapter checkpoint's base copied along by `seed_workdir`
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
            read_only: bool = False, step_prefix: str | None = None, pinned: tuple = ()) -> ocp.CheckpointManager:
  """Checkpoints `<directory>/<step>` (or `<directory>/<step_prefix>_<step>`): the newest `keep`
  are kept, and every step in `pinned` (e.g. the base of adapter checkpoints)."""
  if not read_only:
    refuse_links(directory)
  handlers = {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler(),
              DATA: ocp.JsonCheckpointHandler(), EWC: ocp.StandardCheckpointHandler()}
  level = logging.get_verbosity()
  if read_only:  # Orbax warns that a read-only manager is read-only
    logging.set_verbosity(logging.ERROR)
  try:
    policies = ocp.checkpoint_managers
    keep_policy = policies.LatestN(None if read_only else keep)
    if pinned:
      keep_policy = policies.AnyPreservationPolicy([keep_policy, policies.CustomSteps([int(s) for s in pinned])])
    options = ocp.CheckpointManagerOptions(
        step_prefix=step_prefix, preservation_policy=keep_policy, create=not read_only,
        read_only=read_only, enable_async_checkpointing=async_save and not read_only,
        save_interval_steps=save_interval)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)
  finally:
    logging.set_verbosity(level)


def refuse_links(directory: str) -> None:
  """A checkpoints directory that a run writes to must not be, or hold step directories that are,
  symbolic links: old checkpoints are deleted as new ones are saved, and a deletion must never reach
  through a link into another run's files (nor fail on the link and stop every later save)."""
  links = [directory] if os.path.islink(directory) else []
  if os.path.isdir(directory):
    links += [os.path.join(directory, n) for n in sorted(os.listdir(directory))
              if parse_step_dir(n) and os.path.islink(os.path.join(directory, n))]
  if links:
    raise ValueError(f"checkpoint directory {links[0]} is a symbolic link (to {os.path.realpath(links[0])}); a run "
                     f"deletes its old checkpoints and never deletes through a link. Replace the link with a copy of "
                     f"what it points to (cp -r --dereference); commands that only read a checkpoint (grow --from, "
                     f"merge and BTX sources, export) take the link as it is")


def free_bytes(path: str) -> int:
  """Free space on the file system holding `path` (its nearest existing parent)."""
  while not os.path.exists(path):
    path = os.path.dirname(path) or "."
  return shutil.disk_usage(path).free


def _size(n: float) -> str:
  """Bytes in the largest unit that keeps the number >= 1 (a tiny model's checkpoint is MiB, not
  '0.00 GiB')."""
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024


def save(mngr: ocp.CheckpointManager, step: int, state: dict, meta: dict, data_state: Any = None,
         force: bool = True, ewc: dict | None = None) -> bool:
  """Save (asynchronously if the manager is async). `meta` must be JSON-serialisable; `ewc`
  (optional) is saved as its own item. A disk without room for the state, or any failed write,
  is an OSError naming the path and the free space, raised here at the first save that cannot
  succeed."""
  where = step_dir(mngr, step)
  if is_adapter_only(meta, step):
    state = trainable_part(state)
  need = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves((state, ewc)) if hasattr(x, "dtype"))
  need //= max(jax.process_count(), 1)  # each process writes its own shards
  free = free_bytes(str(mngr.directory))
  if free < need * 1.05 + 2**20:
    raise OSError(f"cannot write checkpoint {where}: it needs about {_size(need)}, {_size(free)} free on "
                  f"{mngr.directory}; free some space and rerun (the run resumes from its newest checkpoint)")
  sums, bad = integrity.survey(state, STATE + "/")
  if ewc is not None:
    ewc_sums, ewc_bad = integrity.survey(ewc, EWC + "/")
    sums, bad = {**sums, **ewc_sums}, bad + ewc_bad
  if bad:
    raise FloatingPointError(f"refusing to write checkpoint {where}: {len(bad)} array(s) hold NaN or infinity, "
                             f"first {bad[:3]}; nothing was written")
  meta = dict(meta, format=FORMAT, integrity={"algorithm": integrity.ALGORITHM, "leaves": sums})
  args = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta),
          DATA: ocp.args.JsonSave({"iterator": data_state})}
  if ewc is not None:
    args[EWC] = ocp.args.StandardSave(ewc)
  try:
    return mngr.save(int(step), args=ocp.args.Composite(**args), force=force)
  except Exception as e:  # noqa: BLE001 - re-raised with the path and the free space
    raise OSError(f"cannot write checkpoint {where} ({type(e).__name__}: {str(e)[:300]}); "
                  f"{_size(free_bytes(str(mngr.directory)))} free on {mngr.directory}") from e


# ---------------------------------------------------------------- adapter checkpoints

def is_adapter_only(meta: dict, step: int) -> bool:
  """Whether the checkpoint at `step` with metadata `meta` holds only the adapters' state (a LoRA
  stage's checkpoints after its base)."""
  base = (meta.get("adapters") or {}).get("base")
  return base is not None and int(step) != int(base["step"])


def trainable_part(state: dict) -> dict:
  """What an adapter checkpoint stores: the adapters, their optimizer state and the step."""
  return {"params": {"lora": state["params"]["lora"]}, "opt_state": state["opt_state"], "step": state["step"]}


def lineage_hash(lineage: list) -> str:
  return hashlib.sha256(json.dumps(lineage, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(params: dict) -> list[float]:
  """[sum of squares, sum] over every base weight (adapters excluded), float64 over per-leaf float32
  reductions: equal for the same weights on any mesh up to ~1e-7 relative."""
  leaves = [v for p, v in flatten(params).items() if not p.startswith("lora/")]
  sq = jax.jit(lambda xs: [jax.numpy.sum(jax.numpy.square(x.astype("float32"))) for x in xs])(leaves)
  lin = jax.jit(lambda xs: [jax.numpy.sum(x.astype("float32")) for x in xs])(leaves)
  return [float(sum(float(x) for x in sq)), float(sum(float(x) for x in lin))]


def base_identity(meta: dict, step: int, params: dict) -> dict:
  """The identity adapter checkpoints record of their base: the base's checkpoint directory name,
  step, lineage hash and weight fingerprint."""
  return {"checkpoint": os.path.basename(str(meta.get("_dir", ""))) or None, "step": int(step),
          "lineage_hash": lineage_hash(meta.get("lineage", [])), "fingerprint": fingerprint(params)}


def with_adapters(meta: dict, cfg: ModelConfig, base_dir: str, step: int, params: dict) -> dict:
  """`meta` of a LoRA stage's checkpoints: the adapters' config and their base's identity (the
  checkpoint `base_dir`, at `step`, holding `params`)."""
  ident = base_identity(dict(meta, _dir=base_dir), step, params)
  return dict(meta, adapters={"rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "targets": list(cfg.lora_targets),
                              "base": ident})


def _same_identity(want: dict, got: dict) -> bool:
  fp_ok = all(abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-12) for a, b in zip(want["fingerprint"], got["fingerprint"]))
  return want["step"] == got["step"] and want["lineage_hash"] == got["lineage_hash"] and fp_ok


def _restore_base(mngr, step: int, meta: dict, abstract_state: dict, where: str) -> dict:
  """The base params of the adapter checkpoint `where`, checked against the identity it records."""
  want = meta["adapters"]["base"]
  base_step, name = int(want["step"]), str(want["checkpoint"])
  base_where = os.path.join(str(mngr.directory), name)
  if not os.path.isdir(os.path.join(base_where, STATE)):
    raise ValueError(f"checkpoint {where} holds adapters only; their base {base_where} is missing (it must stay "
                     f"next to them)")
  prefix = name.rsplit("_", 1)[0] if "_" in name else None
  own = prefix == mngr._options.step_prefix  # noqa: SLF001 - the manager's own naming
  bm = mngr if own else manager(str(mngr.directory), read_only=True, step_prefix=prefix)
  try:
    base_meta = read_meta(bm, base_step)
    stored = _stored_shapes(bm, base_step)
    if stored is not None:
      _check_shapes(stored, abstract_state, base_where)
    try:
      base = bm.restore(base_step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)}))
    except Exception as e:  # noqa: BLE001 - re-raised with the path
      raise CorruptCheckpoint(f"checkpoint {base_where}: restoring the base of {where} failed, its array files "
                              f"are unreadable ({_brief(e)})") from e
    verify(base_meta, STATE, base[STATE], base_where)
  finally:
    if not own:
      bm.close()
  params = base[STATE]["params"]
  got = base_identity(dict(base_meta, _dir=base_where), base_step, params)
  if not _same_identity(want, got):
    raise ValueError(f"checkpoint {where}: its adapters were trained on base {want['checkpoint']} (step "
                     f"{want['step']}, lineage {want['lineage_hash']}, fingerprint {want['fingerprint']}) but "
                     f"{base_where} holds a different base (step {got['step']}, lineage {got['lineage_hash']}, "
                     f"fingerprint {got['fingerprint']}); refusing to load adapters onto another base")
  return params


def _raw_meta(mngr: ocp.CheckpointManager, step: int):
  try:
    out = mngr.restore(int(step), args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
  except Exception as e:  # noqa: BLE001 - re-raised with the path
    raise ValueError(f"checkpoint {step_dir(mngr, step)}: cannot read its metadata ({type(e).__name__}: {e})") from e
  return out[META]


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The checkpoint's metadata, validated (types, ranges, and against the stored arrays)."""
  meta = _raw_meta(mngr, step)
  where = step_dir(mngr, step)
  if not isinstance(meta, dict) or "model" not in meta:
    raise ValueError(f"checkpoint {where}: metadata has no model config; not a moegrow checkpoint")
  check_meta(meta, where, None if is_adapter_only(meta, step) else _stored_shapes(mngr, step))
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


def verify(meta: dict, item: str, tree: Any, where: str, mngr: ocp.CheckpointManager | None = None) -> None:
  """Compare the restored `tree` of checkpoint item `item` with the checksums its metadata records.
  CorruptCheckpoint naming the checkpoint and the first parameters that differ; a current-format
  checkpoint without checksums is refused; one written before checksums existed gets a note."""
  record = meta.get("integrity") if isinstance(meta, dict) else None
  sums, bad = integrity.survey(tree, item + "/")
  if record is None:
    if isinstance(meta, dict) and int(meta.get("format", 1)) >= 2:
      raise CorruptCheckpoint(f"checkpoint {where}: its metadata has no array checksums ('integrity'), which "
                              f"every checkpoint of format {meta.get('format')} records; refusing to trust it")
    logging.warning("checkpoint %s predates array checksums (moegrow < 0.6): its arrays are not verified", where)
    _refuse_nonfinite(bad, where)
    return
  if record.get("algorithm") != integrity.ALGORITHM or not isinstance(record.get("leaves"), dict):
    raise CorruptCheckpoint(f"checkpoint {where}: unknown checksum record {str(record)[:120]!r}")
  differ = integrity.mismatches(tree, record["leaves"], item + "/", sums)
  if differ:
    raise CorruptCheckpoint(f"checkpoint {where} is corrupt: {len(differ)} array(s) differ from what was saved, "
                            f"first {differ[:3]}" + _fallback_hint(mngr, where), where)
  _refuse_nonfinite(bad, where)


def _refuse_nonfinite(bad: list[str], where: str) -> None:
  if bad:
    raise FloatingPointError(f"checkpoint {where} holds NaN or infinity in {len(bad)} array(s), first {bad[:3]}; "
                             f"refusing to build on it")


def _brief(e: BaseException) -> str:
  """An exception in one line: TensorStore's errors carry a page of spec after their first line."""
  text = str(e).split(" See full TensorStore details", 1)[0].splitlines()
  return f"{type(e).__name__}: {(text[0] if text else '')[:240]}"


def _fallback_hint(mngr, where: str) -> str:
  if mngr is None:
    return ""
  others = [s for s in mngr.all_steps() if step_dir(mngr, s) != where]
  if not others:
    return "; no other checkpoint in its directory"
  return (f"; other checkpoints in {mngr.directory}: steps {sorted(others)}. To go on from the newest of them, "
          f"move {where} out of that directory and rerun (or set train.on_corrupt_checkpoint='previous')")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict) -> tuple[dict, dict, Any]:
  """(state, meta, data_iterator_state) at `step`, at exactly the shapes/shardings of
  `abstract_state` (a tree of jax.ShapeDtypeStruct with shardings)."""
  where = step_dir(mngr, step)
  meta = _raw_meta(mngr, step)
  adapter_only = isinstance(meta, dict) and is_adapter_only(meta, step)
  if adapter_only:
    if "lora" not in abstract_state["params"]:
      raise ValueError(f"checkpoint {where} holds LoRA adapters but the model to restore has none (lora_rank=0)")
    full, abstract_state = abstract_state, trainable_part(abstract_state)
  stored = _stored_shapes(mngr, step)
  if stored is not None:
    _check_shapes(stored, abstract_state, where)
  try:
    out = mngr.restore(int(step), args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore()}))
  except Exception as e:  # noqa: BLE001 - re-raised with the path
    raise CorruptCheckpoint(f"checkpoint {where}: restore failed, its array files are unreadable "
                            f"({_brief(e)})" + _fallback_hint(mngr, where), where) from e
  state = out[STATE]
  verify(meta, STATE, state, where, mngr)
  if adapter_only:
    params = dict(_restore_base(mngr, step, meta, full, where), lora=state["params"]["lora"])
    state = dict(state, params=params)
  return state, meta, (out[DATA] or {}).get("iterator")


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
    out = mngr.restore(int(step), args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))[item]
  except Exception as e:  # noqa: BLE001 - re-raised with the path
    raise CorruptCheckpoint(f"checkpoint {where}: restoring item '{item}' failed, its array files are unreadable "
                            f"({_brief(e)})", where) from e
  verify(_raw_meta(mngr, step), item, out, where, mngr)
  return out


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
  base = _adapter_base_dir(src_step_dir)
  shutil.copytree(src_step_dir, os.path.join(tmp, step_name(0, step)))
  if base is not None:  # adapters only: their base travels with them, named so no stage mistakes it for its own
    name = SEEDED_BASE + os.path.basename(base)
    shutil.copytree(base, os.path.join(tmp, name))
    meta_file = os.path.join(tmp, step_name(0, step), META, "metadata")
    with open(meta_file) as f:
      meta = json.load(f)
    meta["adapters"]["base"]["checkpoint"] = name
    with open(meta_file, "w") as f:
      json.dump(meta, f)
  os.replace(tmp, os.path.join(workdir, "checkpoints"))
  return True


def _adapter_base_dir(src_step_dir: str) -> str | None:
  """The base checkpoint next to an adapter checkpoint (None for an ordinary checkpoint)."""
  try:
    with open(os.path.join(src_step_dir, META, "metadata")) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  parsed = parse_step_dir(os.path.basename(os.path.normpath(src_step_dir)))
  if parsed is None or not is_adapter_only(meta, parsed[1]):
    return None
  base = os.path.join(os.path.dirname(os.path.normpath(src_step_dir)), meta["adapters"]["base"]["checkpoint"])
  if not os.path.isdir(os.path.join(base, STATE)):
    raise FileNotFoundError(f"checkpoint {src_step_dir} holds adapters only and its base {base} is missing")
  return base


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
