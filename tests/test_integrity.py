"""Array checksums (moegrow/integrity.py) against a naive numpy reference, and every restore path
refusing a corrupt checkpoint: flipped bytes, a cut-off array file, checksums deleted from a
current-format checkpoint; an untouched checkpoint and one written before checksums restore."""
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moegrow import checkpoint, integrity
from moegrow.orchestrate import merging, stages
from moegrow.orchestrate.validate import ConfigError, validate_config
from conftest import TINY_RUN
from _tiny import digest, train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)


def naive(x: np.ndarray) -> str:
  """The documented sum by a plain loop over the elements' bits (Python integers, mod 2^32)."""
  bits = x.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
  c = 0
  for i, b in enumerate(int(v) for v in bits):
    c = (c + b * (2 * i + 1)) % 2**32
  return f"{c:08x}"


def test_checksums_are_the_documented_sums():
  f32 = RNG.normal(size=(3, 7, 11)).astype(np.float32)
  bf16 = np.asarray(jnp.asarray(RNG.normal(size=(5, 3)), jnp.bfloat16))
  tree = {"a": {"w_DF": jnp.asarray(f32)}, "b": jnp.asarray(bf16), "step": jnp.asarray(12345, jnp.int32)}
  got = integrity.checksums(tree, "state/")
  assert got == {"state/a/w_DF": "float32:" + naive(f32), "state/b": "bfloat16:" + naive(bf16),
                 "state/step": "int32:" + naive(np.asarray(12345, np.int32))}


def test_checksums_are_the_same_on_any_mesh():
  x = RNG.normal(size=(16, 24)).astype(np.float32)
  want = integrity.checksums({"x": jnp.asarray(x)})
  devices = np.array(jax.devices()[:8])
  for shape, spec in (((8, 1), P("a", None)), ((2, 4), P("a", "b")), ((4, 2), P("b", "a"))):
    mesh = Mesh(devices.reshape(shape), ("a", "b"))
    assert integrity.checksums({"x": jax.device_put(x, NamedSharding(mesh, spec))}) == want, shape


def test_any_single_bit_flip_is_caught():
  x = RNG.normal(size=(32, 16)).astype(np.float32)
  record = integrity.checksums({"w": jnp.asarray(x)})
  assert integrity.mismatches({"w": jnp.asarray(x)}, record) == []
  for i, bit in zip(RNG.integers(0, x.size, 20), RNG.integers(0, 32, 20)):
    y = x.copy().reshape(-1)
    y.view(np.uint32)[i] ^= np.uint32(1 << int(bit))
    assert integrity.mismatches({"w": jnp.asarray(y.reshape(x.shape))}, record) == ["w"], (i, bit)


def test_a_leaf_restored_wider_is_checked_at_its_saved_dtype():
  x = jnp.asarray(RNG.normal(size=(6, 5)), jnp.bfloat16)
  record = integrity.checksums({"w": x})
  assert integrity.mismatches({"w": x.astype(jnp.float32)}, record) == []
  assert integrity.mismatches({"w": x.astype(jnp.float32).at[0, 0].add(1.0)}, record) == ["w"]
  assert integrity.mismatches({"w": x, "new": x}, record) == ["new"]  # a leaf nothing recorded


# ---------------------------------------------------------------- real checkpoints

def corrupt(step_dir: str, how: str) -> str:
  """Damage the largest array file of a checkpoint's state: flip 4 bytes in its middle, or cut it in
  half. Returns the file's path."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, checkpoint.STATE)) for f in fs]
  big = max(files, key=os.path.getsize)
  size = os.path.getsize(big)
  with open(big, "r+b") as f:
    if how == "flip":
      f.seek(size // 2)
      b = f.read(4)
      f.seek(size // 2)
      f.write(bytes(v ^ 0xFF for v in b))
    else:
      f.truncate(size // 2)
  return big


def edit_meta(step_dir: str, fn) -> None:
  path = os.path.join(step_dir, checkpoint.META, "metadata")
  with open(path) as f:
    meta = json.load(f)
  fn(meta)
  with open(path, "w") as f:
    json.dump(meta, f)


STATE = {"params": {"w_DF": RNG.normal(size=(256, 512)).astype(np.float32)}, "step": np.int32(3)}


@pytest.fixture
def saved(tmp_path):
  """A real Orbax checkpoint directory with steps 1 and 3 of a small state."""
  d = str(tmp_path / "ckpt")
  mngr = checkpoint.manager(d)
  for step in (1, 3):
    checkpoint.save(mngr, step, jax.tree_util.tree_map(jnp.asarray, STATE), {"model": {}, "stage": 0, "lineage": []})
  mngr.wait_until_finished()
  mngr.close()
  return d


def restore(d, step=3):
  mngr = checkpoint.manager(d, read_only=True)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
      Mesh(np.array(jax.devices()[:1]), ("d",)), P())), STATE)
  try:
    return checkpoint.restore(mngr, step, abstract)
  finally:
    mngr.close()


def test_an_untouched_checkpoint_restores_and_records_every_leaf(saved):
  state, meta, _ = restore(saved)
  np.testing.assert_array_equal(np.asarray(state["params"]["w_DF"]), STATE["params"]["w_DF"])
  assert meta["format"] == checkpoint.FORMAT
  assert set(meta["integrity"]["leaves"]) == {"state/params/w_DF", "state/step"}


@pytest.mark.parametrize("how, says", [("flip", r"is corrupt: 1 array\(s\) differ .*state/params/w_DF"),
                                       ("truncate", r"unreadable")])
def test_a_damaged_array_file_is_refused_naming_the_checkpoint(saved, how, says):
  corrupt(os.path.join(saved, "3"), how)
  with pytest.raises(checkpoint.CorruptCheckpoint, match=rf"checkpoint {saved}/3.*{says}.*steps \[1\]") as e:
    restore(saved)
  assert "TensorStore(" not in str(e.value)  # one line, not the store's spec
  restore(saved, step=1)  # the older checkpoint is intact


def test_checksums_deleted_from_a_current_checkpoint_are_refused(saved):
  edit_meta(os.path.join(saved, "3"), lambda m: m.pop("integrity"))
  with pytest.raises(checkpoint.CorruptCheckpoint, match=r"3: its metadata has no array checksums"):
    restore(saved)


def test_a_checkpoint_from_before_checksums_restores_with_a_note(saved, caplog):
  edit_meta(os.path.join(saved, "3"), lambda m: (m.pop("integrity"), m.pop("format")))
  with caplog.at_level(logging.WARNING):
    state, _, _ = restore(saved)
  np.testing.assert_array_equal(np.asarray(state["params"]["w_DF"]), STATE["params"]["w_DF"])
  assert any("predates array checksums" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- every path that restores

def no_checkpoint(workdir) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return not os.path.isdir(d) or not any(checkpoint.parse_step_dir(n) for n in os.listdir(d))


def test_a_corrupt_newest_checkpoint_stops_a_resume_and_says_how_to_go_on(tmp_path, data_dir):
  wd = str(tmp_path / "run")
  c = train_config(data_dir, steps=4, checkpoint_every=2, eval_every=0)
  stages.train_and_evaluate(c, wd)
  corrupt(os.path.join(wd, "checkpoints", "4"), "flip")
  c.train.steps = 6
  # Flipped bytes inside a zstd-compressed chunk either decompress to wrong values (the checksums
  # differ) or fail to decompress (unreadable), depending on where the chunk lands in the file;
  # both name the checkpoint, the others and how to go on.
  with pytest.raises(checkpoint.CorruptCheckpoint,
                     match=r"checkpoints/4( is corrupt|: restore failed, its array files are unreadable).*"
                           r"steps \[2\].*move .*/4 out"):
    stages.train_and_evaluate(c, wd)
  shutil.move(os.path.join(wd, "checkpoints", "4"), str(tmp_path / "corrupt-4"))
  assert stages.train_and_evaluate(c, wd)["step"] == 6  # resumed from step 2


def test_on_corrupt_checkpoint_previous_moves_it_aside_and_resumes(tmp_path, data_dir, capsys):
  wd = str(tmp_path / "run")
  c = train_config(data_dir, steps=4, checkpoint_every=2, eval_every=0, on_corrupt_checkpoint="previous")
  stages.train_and_evaluate(c, wd)
  damaged = corrupt(os.path.join(wd, "checkpoints", "4"), "truncate")
  size = os.path.getsize(damaged)
  c.train.steps = 6
  result = stages.train_and_evaluate(c, wd)
  out = capsys.readouterr().out
  assert result["step"] == 6 and f"moved it to {wd}/corrupt/4" in out and "resumed from" in out and "at step 2" in out
  moved = os.path.join(wd, "corrupt", "4", os.path.relpath(damaged, os.path.join(wd, "checkpoints", "4")))
  assert os.path.getsize(moved) == size  # kept as it was, not deleted
  with pytest.raises(ConfigError, match=r"train.on_corrupt_checkpoint"):
    validate_config(train_config(data_dir, on_corrupt_checkpoint="newest"), 8)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_grow_and_merge_refuse_a_corrupt_source_and_write_nothing(tmp_path, data_dir, tiny_run, how):
  src = tiny_run(0, tmp_path / "src")
  corrupt(os.path.join(src, "checkpoints", "4"), how)
  before = digest(src)
  grow = train_config(data_dir, steps=0, eval_every=0)
  grow.stages = (dict(name="dense", steps=4),
                 dict(name="moe", steps=2, ops=(dict(op="upcycle", layers=[1], num_experts=2, top_k=1),)))
  with pytest.raises(checkpoint.CorruptCheckpoint, match=r"src/checkpoints/4"):
    stages.grow_offline(grow, src, str(tmp_path / "grown"))
  assert no_checkpoint(tmp_path / "grown")
  other = tiny_run(1, tmp_path / "other")
  merge = train_config(data_dir, steps=2)
  merge.merge = dict(sources=[other, src], base="", method="linear", params={}, overrides=[], seed=0)
  with pytest.raises(checkpoint.CorruptCheckpoint, match=r"src/checkpoints/4"):
    merging.merge_run(merge, str(tmp_path / "merged"))
  assert no_checkpoint(tmp_path / "merged")
  assert digest(src) == before  # the source is only read


@pytest.mark.slow
def test_the_command_names_a_truncated_checkpoint_in_its_last_line(tmp_path, data_dir):
  """In a fresh process: exit 1, the last line names the checkpoint and the way on; none of the
  checkpointer's echoes (event loop closed, the array store's spec) after it."""
  wd = str(tmp_path / "run")
  args = [sys.executable, "-m", "moegrow.main", "--config=configs/lm.py:tiny", f"--workdir={wd}",
          f"--config.data.data_dir={data_dir}", "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
          "--config.mesh.num_devices=1", "--config.mesh.data=1"]
  run = lambda steps: subprocess.run(args + [f"--config.train.steps={steps}"], cwd=REPO, capture_output=True,
                                     text=True, timeout=600)
  assert run(4).returncode == 0
  corrupt(os.path.join(wd, "checkpoints", "4"), "truncate")
  p = run(6)
  out = (p.stdout + p.stderr).strip()
  assert p.returncode == 1, out[-2000:]
  last = out.splitlines()[-1]
  assert last.startswith(f"moegrow: error: checkpoint {wd}/checkpoints/4: restore failed, its array files are "
                         "unreadable") and "steps [2]" in last, last
  assert "Event loop is closed" not in out and "TensorStore" not in out


# ---------------------------------------------------------------- no poisoned write

def nan_run(tiny_run, data_dir, dest, value=float("nan")) -> str:
  """A finished run whose checkpoint holds `value` (NaN) in one weight, written as moegrow 0.5 wrote
  checkpoints (no checksums, no format): restored, poisoned, saved back through Orbax directly."""
  from moegrow.orchestrate import parts
  from moegrow.train import steps
  wd = tiny_run(0, dest)
  c = train_config(data_dir, **TINY_RUN)
  prog = steps.build_program(parts.model_config(c), c.train, parts.make_mesh(c))
  mngr = checkpoint.manager(os.path.join(wd, "checkpoints"))
  state, meta, data_state = checkpoint.restore(mngr, 4, prog.abstract_state)
  mngr.close()
  state["params"]["embed_VD"] = state["params"]["embed_VD"].at[3, 2].set(value)
  meta = {k: v for k, v in meta.items() if k not in ("format", "integrity")}
  shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
  mngr = checkpoint.manager(os.path.join(wd, "checkpoints"))
  mngr.save(4, args=checkpoint.ocp.args.Composite(**{
      checkpoint.STATE: checkpoint.ocp.args.StandardSave(state), checkpoint.META: checkpoint.ocp.args.JsonSave(meta),
      checkpoint.DATA: checkpoint.ocp.args.JsonSave({"iterator": data_state})}), force=True)
  mngr.wait_until_finished()
  mngr.close()
  return wd


def test_a_checkpoint_is_never_written_with_a_nan(tmp_path):
  mngr = checkpoint.manager(str(tmp_path / "ckpt"))
  state = jax.tree_util.tree_map(jnp.asarray, STATE)
  state["params"]["w_DF"] = state["params"]["w_DF"].at[7, 9].set(jnp.inf)
  with pytest.raises(FloatingPointError, match=r"refusing to write checkpoint .*ckpt/3: 1 array\(s\) hold NaN or "
                                               r"infinity, first \['state/params/w_DF'\]; nothing was written"):
    checkpoint.save(mngr, 3, state, {"model": {}, "stage": 0, "lineage": []})
  mngr.close()
  assert not os.path.exists(tmp_path / "ckpt" / "3")


def test_grow_merge_btx_and_export_of_a_nan_checkpoint_write_nothing(tmp_path, data_dir, tiny_run):
  from moegrow.configs import lm
  from moegrow.hf import convert
  from moegrow.orchestrate import branching
  src = nan_run(tiny_run, data_dir, tmp_path / "src")
  before = digest(src)
  says = rf"checkpoint {src}/checkpoints/4 holds NaN or infinity in 1 array\(s\), first \['state/params/embed_VD'\]"
  grow = train_config(data_dir, steps=0, eval_every=0)
  grow.stages = (dict(name="dense", steps=4),
                 dict(name="moe", steps=2, ops=(dict(op="upcycle", layers=[1], num_experts=2, top_k=1),)))
  with pytest.raises(FloatingPointError, match=says):
    stages.grow_offline(grow, src, str(tmp_path / "grown"))
  assert no_checkpoint(tmp_path / "grown") and not os.path.exists(tmp_path / "grown" / "growth")
  merge = train_config(data_dir, steps=2)
  merge.merge = dict(sources=[tiny_run(1, tmp_path / "other"), src], base="", method="linear", params={},
                     overrides=[], seed=0)
  with pytest.raises(FloatingPointError, match=says):
    merging.merge_run(merge, str(tmp_path / "merged"))
  assert no_checkpoint(tmp_path / "merged")
  btx = train_config(data_dir, steps=2, eval_every=0, checkpoint_every=2)
  btx.btx = dict(seed=src, branches=[dict(name="a", mixture={"shakespeare_plays": 1.0}, steps=1),
                                     dict(name="b", mixture={"python_stdlib": 1.0}, steps=1)],
                 layers=[1], top_k=1, gating="softmax_topk", router="hidden")
  with pytest.raises(FloatingPointError, match=r"holds NaN or infinity .*embed_VD"):
    branching.btx_run(btx, str(tmp_path / "btx"))
  assert no_checkpoint(tmp_path / "btx")
  base = lm.get_config("tiny")
  base.mesh.update(data=1, num_devices=1)
  with pytest.raises(FloatingPointError, match=says):
    convert.export_model(src, str(tmp_path / "hf"), base)
  assert not os.path.exists(tmp_path / "hf")
  assert digest(src) == before  # the source is only read


def test_a_growth_or_merge_whose_loss_is_not_finite_writes_nothing(tmp_path, data_dir, tiny_run):
  """Finite weights, infinite loss (an embedding row of 3e38 overflows the forward pass): the
  certificate's loss is not finite, so nothing is written and the error names the source."""
  big = nan_run(tiny_run, data_dir, tmp_path / "big", value=3e38)
  grow = train_config(data_dir, steps=0, eval_every=0)
  grow.stages = (dict(name="dense", steps=4),
                 dict(name="moe", steps=2, ops=(dict(op="upcycle", layers=[1], num_experts=2, top_k=1),)))
  with pytest.raises(FloatingPointError, match=rf"growing checkpoint {big}/checkpoints/4: the held-out loss is not "
                                               r"finite .*nothing was written"):
    stages.grow_offline(grow, big, str(tmp_path / "grown"))
  assert no_checkpoint(tmp_path / "grown") and not os.path.exists(tmp_path / "grown" / "growth")
  merge = train_config(data_dir, steps=2)
  merge.merge = dict(sources=[tiny_run(1, tmp_path / "other"), big], base="", method="linear", params={},
                     overrides=[], seed=0)
  with pytest.raises(FloatingPointError, match=rf"merge: the held-out loss of {big}.* is not finite"):
    merging.merge_run(merge, str(tmp_path / "merged"))
  assert no_checkpoint(tmp_path / "merged")


# ---------------------------------------------------------------- symbolic links

@pytest.mark.parametrize("what", ["step", "folder"])
def test_a_linked_checkpoint_is_refused_at_start_and_its_target_untouched(tmp_path, data_dir, tiny_run, what):
  """A run whose step directory (or whole checkpoints folder) is a symbolic link stops before
  training, naming the link; what the link points to is byte-identical afterwards. Reading through
  the link (growing from it) is allowed."""
  elsewhere = tiny_run(0, tmp_path / "elsewhere")
  before = digest(elsewhere)
  wd = tmp_path / "run"
  if what == "step":
    os.makedirs(wd / "checkpoints")
    os.symlink(os.path.join(elsewhere, "checkpoints", "4"), wd / "checkpoints" / "4")
    link = wd / "checkpoints" / "4"
  else:
    os.makedirs(wd)
    os.symlink(os.path.join(elsewhere, "checkpoints"), wd / "checkpoints")
    link = wd / "checkpoints"
  c = train_config(data_dir, steps=12, checkpoint_every=2, eval_every=0, keep_checkpoints=1)
  with pytest.raises(ValueError, match=rf"checkpoint directory {link} is a symbolic link .*never deletes through a "
                                       r"link"):
    stages.train_and_evaluate(c, str(wd))
  assert digest(elsewhere) == before
  grow = train_config(data_dir, steps=0, eval_every=0)
  grow.stages = (dict(name="dense", steps=4),
                 dict(name="moe", steps=2, ops=(dict(op="upcycle", layers=[1], num_experts=2, top_k=1),)))
  cert = stages.grow_offline(grow, str(link), str(tmp_path / "grown"))
  assert cert["step"] == 4 and digest(elsewhere) == before
