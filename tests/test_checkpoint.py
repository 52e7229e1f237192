"""moegrow.checkpoint on real Orbax checkpoints: round trips, refusals that name paths, step
directory names, locating checkpoints and atomic side files."""
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moegrow import checkpoint, sharding
from moegrow.configs import lm
from moegrow.train import steps

from _tiny import moe

DATA_STATE = {"shards": {"0": {"next_index": 17, "epoch": 1}, "1": {"next_index": 3, "epoch": 0}}, "seed": 0}


def program(mesh_shape=None, cfg=None):
  cfg = cfg or moe()
  return steps.build_program(cfg, lm.get_config("tiny").train, sharding.make_mesh(mesh_shape or {"data": 1}))


def meta_of(cfg, **kw):
  return {"model": cfg.to_dict(), "stage": 0, "lineage": [], **kw}


def leaves_by_path(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def save_simple(directory, step=5, meta=None, step_prefix=None, state=None):
  """A small state saved synchronously; returns the (closed-over) manager. Its arrays agree with
  the metadata's model as far as `read_meta` checks (the stored blocks and the embedding)."""
  mngr = checkpoint.manager(str(directory), async_save=False, step_prefix=step_prefix)
  cfg = moe()
  state = state or {"params": {"embed_VD": jnp.zeros((cfg.vocab_size, cfg.d_model)),
                               "blocks": {str(i): {"w": jnp.arange(6.0).reshape(2, 3)} for i in range(cfg.num_layers)}},
                    "step": jnp.asarray(step, jnp.int32)}
  checkpoint.save(mngr, step, state, meta if meta is not None else meta_of(moe()), DATA_STATE)
  mngr.wait_until_finished()
  return mngr


def random_state(abstract, seed=0):
  """A train state (params, Adam state, step) with random values (no compilation), placed as `abstract` says."""
  rng = np.random.default_rng(seed)

  def one(s):
    x = (rng.integers(0, 1000, s.shape) if jnp.issubdtype(s.dtype, jnp.integer) else rng.standard_normal(s.shape))
    return jax.device_put(np.asarray(x, s.dtype), s.sharding)
  return jax.tree_util.tree_map(one, abstract)


def abstract_of(tree):
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), tree)


# ---------------------------------------------------------------- round trips

def test_save_restore_round_trip_of_a_train_state(tmp_path):
  prog = program()
  state = random_state(prog.abstract_state)
  state["step"] = jnp.asarray(7, jnp.int32)
  cfg = prog.cfg
  mngr = checkpoint.manager(str(tmp_path / "checkpoints"))  # asynchronous saves
  assert checkpoint.save(mngr, 7, state, meta_of(cfg, note="hello"), DATA_STATE)
  mngr.wait_until_finished()
  mngr.close()
  assert os.path.isdir(tmp_path / "checkpoints" / "7" / "state")

  reader = checkpoint.manager(str(tmp_path / "checkpoints"), read_only=True)
  assert reader.latest_step() == 7
  meta = checkpoint.read_meta(reader, 7)
  assert meta["note"] == "hello" and checkpoint.model_config(meta) == cfg
  got, meta2, data_state = checkpoint.restore(reader, 7, prog.abstract_state)
  assert meta2 == meta and data_state == DATA_STATE
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(state)
  want = leaves_by_path(state)
  have = leaves_by_path(got)
  assert have.keys() == want.keys() and len(want) > 20
  for p, x in want.items():
    np.testing.assert_array_equal(have[p], x, err_msg=p)
    assert have[p].dtype == x.dtype, p
  # Onto another mesh: the abstract state's shardings decide where the restored arrays live.
  prog8 = program({"data": 2, "expert": 4})
  got8, _, _ = checkpoint.restore(reader, 7, prog8.abstract_state)
  wact = got8["params"]["blocks"]["1"]["mlp"]["wact_EDF"]
  assert len(wact.sharding.device_set) == 8 and wact.addressable_shards[0].data.shape == (1, 16, 24)
  np.testing.assert_array_equal(np.asarray(wact), np.asarray(state["params"]["blocks"]["1"]["mlp"]["wact_EDF"]))
  reader.close()


def test_save_without_data_state_restores_none(tmp_path):
  mngr = checkpoint.manager(str(tmp_path), async_save=False)
  state = {"w": jnp.ones((2,))}
  checkpoint.save(mngr, 1, state, meta_of(moe()))
  got, _, data_state = checkpoint.restore(mngr, 1, abstract_of(state))
  assert data_state is None
  np.testing.assert_array_equal(np.asarray(got["w"]), [1.0, 1.0])
  mngr.close()


def test_restore_with_mismatched_tree_names_the_paths(tmp_path):
  mngr = save_simple(tmp_path / "ckpts", step=5,
                     state={"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.asarray(5, jnp.int32)})
  where = str(tmp_path / "ckpts" / "5")
  good = abstract_of({"params": {"w": jnp.zeros((2, 3))}, "step": jnp.zeros((), jnp.int32)})
  got, _, _ = checkpoint.restore(mngr, 5, good)
  np.testing.assert_array_equal(np.asarray(got["params"]["w"]), np.arange(6.0).reshape(2, 3))

  wrong_shape = abstract_of({"params": {"w": jnp.zeros((3, 3))}, "step": jnp.zeros((), jnp.int32)})
  with pytest.raises(ValueError) as err:
    checkpoint.restore(mngr, 5, wrong_shape)
  msg = str(err.value)
  assert f"checkpoint {where}" in msg and "params/w: got (2, 3), want (3, 3)" in msg

  other_tree = abstract_of({"params": {"w": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}})
  with pytest.raises(ValueError) as err:
    checkpoint.restore(mngr, 5, other_tree)
  msg = str(err.value)
  assert f"checkpoint {where}" in msg
  assert "missing leaves: ['params/b']" in msg and "unexpected leaves: ['step']" in msg
  mngr.close()


# ---------------------------------------------------------------- metadata

def test_read_meta_of_checkpoint_without_model_config_names_the_path(tmp_path):
  mngr = save_simple(tmp_path / "ckpts", step=3, meta={"note": "not ours"})
  with pytest.raises(ValueError, match=rf"checkpoint {tmp_path / 'ckpts' / '3'}: metadata has no model config; "
                                       r"not a moegrow checkpoint"):
    checkpoint.read_meta(mngr, 3)
  mngr.close()


def test_read_meta_of_foreign_orbax_checkpoint_names_the_path(tmp_path):
  # A plain Orbax checkpoint with a single 'state' item and no metadata item.
  foreign = ocp.CheckpointManager(str(tmp_path / "foreign"), item_handlers={"state": ocp.StandardCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
  foreign.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": jnp.ones(3)})))
  foreign.wait_until_finished()
  foreign.close()
  mngr = checkpoint.manager(str(tmp_path / "foreign"), read_only=True)
  with pytest.raises(ValueError, match=rf"checkpoint {tmp_path / 'foreign' / '4'}: cannot read its metadata"):
    checkpoint.read_meta(mngr, 4)
  mngr.close()


def test_step_prefix_directories(tmp_path):
  mngr = save_simple(tmp_path / "ckpts", step=9, step_prefix=checkpoint.stage_prefix(2))
  assert checkpoint.step_dir(mngr, 9) == str(tmp_path / "ckpts" / "stage2_9")
  assert os.path.isdir(tmp_path / "ckpts" / "stage2_9" / "state")
  assert checkpoint.locate(str(tmp_path / "ckpts" / "stage2_9")) == (str(tmp_path / "ckpts"), "stage2", 9)
  assert checkpoint.read_meta(mngr, 9)["model"] == moe().to_dict()
  mngr.close()


# ---------------------------------------------------------------- names

def test_stage_prefix_and_parse_step_dir():
  assert checkpoint.stage_prefix(0) is None
  assert checkpoint.stage_prefix(3) == "stage3"
  assert checkpoint.stage_prefix(np.int64(2)) == "stage2"
  assert checkpoint.parse_step_dir("300") == (0, 300)
  assert checkpoint.parse_step_dir("stage2_300") == (2, 300)
  assert checkpoint.parse_step_dir("stage12_0") == (12, 0)
  for bad in ("stage_3", "stage2_", "300.orbax-checkpoint-tmp-17", "-1", "x300", "300x", "", "tmp", "stage2-300"):
    assert checkpoint.parse_step_dir(bad) is None, bad
  for stage, step in [(0, 0), (0, 1200), (1, 100), (7, 5)]:
    prefix = checkpoint.stage_prefix(stage)
    assert checkpoint.parse_step_dir(f"{prefix}_{step}" if prefix else str(step)) == (stage, step)


# ---------------------------------------------------------------- locate

def _fake_step_dirs(root, names, with_state=True):
  for n in names:
    os.makedirs(os.path.join(root, n, "state") if with_state else os.path.join(root, n))


def test_locate_workdir_checkpoints_dir_and_step_dir(tmp_path, monkeypatch):
  work = tmp_path / "run"
  ckpts = work / "checkpoints"
  _fake_step_dirs(ckpts, ["100", "150", "stage1_100", "stage1_120", "tmp", "160.orbax-checkpoint-tmp-3"])
  assert checkpoint.locate(str(work)) == (str(ckpts), None, 150)
  assert checkpoint.locate(str(ckpts)) == (str(ckpts), None, 150)
  assert checkpoint.locate(str(ckpts) + "/") == (str(ckpts), None, 150)
  assert checkpoint.locate(str(ckpts / "stage1_100")) == (str(ckpts), "stage1", 100)
  assert checkpoint.locate(str(ckpts / "100")) == (str(ckpts), None, 100)
  # At a boundary both stages hold the same step; the grown (later-stage) one is the newest.
  _fake_step_dirs(ckpts, ["200", "stage1_200"])
  assert checkpoint.locate(str(work)) == (str(ckpts), "stage1", 200)
  # Relative paths resolve against the working directory.
  monkeypatch.chdir(tmp_path)
  assert checkpoint.locate("run") == (str(ckpts), "stage1", 200)


def test_locate_real_checkpoint(tmp_path):
  save_simple(tmp_path / "run" / "checkpoints", step=12).close()
  ckpts, prefix, step = checkpoint.locate(str(tmp_path / "run"))
  assert (ckpts, prefix, step) == (str(tmp_path / "run" / "checkpoints"), None, 12)
  mngr = checkpoint.manager(ckpts, read_only=True, step_prefix=prefix)
  assert checkpoint.model_config(checkpoint.read_meta(mngr, step)) == moe()
  mngr.close()


def test_locate_errors_name_the_path(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match=rf"checkpoint path {missing} does not exist"):
    checkpoint.locate(str(missing))
  a_file = tmp_path / "metrics.jsonl"
  a_file.write_text("{}")
  with pytest.raises(ValueError, match=rf"checkpoint path {a_file} is a file"):  # not "does not exist"
    checkpoint.locate(str(a_file))
  empty = tmp_path / "empty"
  _fake_step_dirs(empty / "checkpoints", ["notastep"])
  with pytest.raises(FileNotFoundError, match=rf"no checkpoint in {empty / 'checkpoints'}"):
    checkpoint.locate(str(empty))
  _fake_step_dirs(tmp_path / "c", ["40"], with_state=False)
  with pytest.raises(ValueError, match=rf"checkpoint {tmp_path / 'c' / '40'} has no 'state' item"):
    checkpoint.locate(str(tmp_path / "c" / "40"))


# ---------------------------------------------------------------- side files

def test_write_json_is_atomic_and_creates_directories(tmp_path):
  path = str(tmp_path / "growth" / "deep" / "300.json")
  checkpoint.write_json(path, {"b": 1, "a": [1.5, None], "where": pathlib.Path("/x/y")})
  with open(path) as f:
    text = f.read()
  assert json.loads(text) == {"a": [1.5, None], "b": 1, "where": "/x/y"}  # default=str for other objects
  assert text.index('"a"') < text.index('"b"')  # sorted keys
  assert os.listdir(os.path.dirname(path)) == ["300.json"]  # no temporary file left behind
  checkpoint.write_json(path, {"new": True})
  with open(path) as f:
    assert json.load(f) == {"new": True}
  assert os.listdir(os.path.dirname(path)) == ["300.json"]


def test_write_json_failure_leaves_the_old_file_intact(tmp_path):
  path = str(tmp_path / "cert.json")
  checkpoint.write_json(path, {"ok": 1})
  with pytest.raises(TypeError):
    checkpoint.write_json(path, {(1, 2): "tuple keys are not JSON"})
  with open(path) as f:
    assert json.load(f) == {"ok": 1}
  assert os.listdir(tmp_path) == ["cert.json"]  # the failed write's temporary file is gone
