"""What moegrow guarantees (docs/guarantees.md): bad input is refused before anything
runs, with a message naming the key; no poisoned state is saved; one run per workdir;
metrics.jsonl stays consistent through kills; SIGTERM at any point (growth included) leaves a
resumable state; crafted checkpoint files and corrupt corpora are refused naming the path."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moegrow import checkpoint, data
from moegrow.configs import grow as grow_config
from moegrow.configs import lm
from moegrow.orchestrate import parts, stages, validate
from moegrow.train import steps
from moegrow.workdir_lock import WorkdirLock
from _tiny import read_metrics, train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(workdir, data_dir, *overrides, config="configs/lm.py:tiny", module="moegrow.main", wait=True, env=None):
  cmd = [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", *overrides]
  p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env={**os.environ, **(env or {})})
  if not wait:
    return p
  out, _ = p.communicate(timeout=600)
  return p.returncode, out


def wait_for(p, text, timeout=300):
  """Read the child's output until `text` appears; returns what was read."""
  seen, t0 = "", time.time()
  while text not in seen:
    line = p.stdout.readline()
    if not line:
      raise AssertionError(f"process ended before printing {text!r}:\n{seen[-3000:]}")
    seen += line
    assert time.time() - t0 < timeout, f"timed out waiting for {text!r}"
  return seen


# ---------------------------------------------------------------- 1. bad configs

def staged_tiny():
  c = grow_config.get_config("tiny")
  c.mesh.num_devices = 0
  return c


BAD = [  # (key named in the message, how to break the tiny config)
    ("train.steps", lambda c: c.train.update(steps=0)),
    ("train.steps", lambda c: c.train.update(steps=-5)),
    ("train.batch_size", lambda c: c.train.update(batch_size=0)),
    ("train.log_every", lambda c: c.train.update(log_every=0)),
    ("train.checkpoint_every", lambda c: c.train.update(checkpoint_every=0)),
    ("train.keep_checkpoints", lambda c: c.train.update(keep_checkpoints=0)),
    ("train.eval_every", lambda c: c.train.update(eval_every=-1)),
    ("train.eval_batches", lambda c: c.train.update(eval_batches=-1)),
    ("train.lr", lambda c: c.train.update(lr=0.0)),
    ("train.lr", lambda c: c.train.update(lr=float("nan"))),
    ("train.b2", lambda c: c.train.update(b2=1.0)),
    ("train.weight_decay", lambda c: c.train.update(weight_decay=-0.1)),
    ("train.schedule", lambda c: c.train.update(schedule="linear")),
    ("train.warmup_steps", lambda c: c.train.update(warmup_steps=-1)),
    ("train.frozen[0]", lambda c: c.train.update(frozen=("no_such_param",))),
    ("train.frozen[0]", lambda c: c.train.update(frozen=("blocks/(",))),
    ("train.frozen[0]", lambda c: c.train.update(frozen=({"path": "embed_VD", "axis": 0, "start": 0, "stop": 999},))),
    ("train.frozen[0].lr_scale", lambda c: c.train.update(frozen=({"path": "embed_VD", "lr_scale": -1.0},))),
    ("model.top_k", lambda c: c.model.update(top_k=0)),
    ("model.top_k", lambda c: c.model.update(moe_layers="all", num_experts=2, top_k=3)),
    ("model.capacity_factor", lambda c: c.model.update(moe_layers="all", capacity_factor=0.0)),
    ("model.capacity_factor", lambda c: c.model.update(capacity_factor=-1.25)),
    ("model.dtype", lambda c: c.model.update(dtype="float8")),
    ("model.num_heads", lambda c: c.model.update(num_heads=0)),
    ("model.gating", lambda c: c.model.update(gating="softmax")),
    ("model.router_jitter", lambda c: c.model.update(router_jitter=1.5)),
    ("data.seq_len", lambda c: c.data.update(seq_len=0)),
    ("data.mixture.python_stdlib", lambda c: c.data.mixture.update(python_stdlib=-1.0)),
    ("data.mixture", lambda c: c.data.mixture.update(python_stdlib=0.0, shakespeare_plays=0.0)),
    ("mesh", lambda c: c.mesh.update(data=3)),  # 3 of 8 devices: one would sit idle
    ("mesh.fsdp", lambda c: c.mesh.update(fsdp=0)),
    ("mesh.num_devices", lambda c: c.mesh.update(num_devices=9)),
    ("train.batch_size", lambda c: (c.mesh.update(data=1, fsdp=8), c.train.update(batch_size=12))),
    ("train.eval_batch_size", lambda c: c.train.update(eval_batch_size=4)),
]


def second_stage(**kw):
  """Replace fields of stage 1 of the staged tiny config."""
  return lambda c: setattr(c, "stages", (c.stages[0], {**dict(c.stages[1]), **kw}))


STAGED_BAD = [
    ("stages[1].steps", second_stage(steps=-3)),
    ("train.steps", lambda c: c.train.update(steps=7)),  # ignored before: the stages decide
    ("stages[1].ops", second_stage(ops=(dict(op="grow_taller"),))),
    ("stages[1].mixture.c4", second_stage(mixture={"c4": -2.0})),
    ("stages[1].freeze_old_experts", second_stage(freeze_old_experts=True, ops=(dict(op="stack", times=2),))),
    ("stages[1]", second_stage(lora_rank=4)),  # an unknown stage key
]
CASES = [(k, f, lambda: lm.get_config("tiny")) for k, f in BAD] + [(k, f, staged_tiny) for k, f in STAGED_BAD]


@pytest.mark.parametrize("key, fix, base", CASES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(CASES)])
def test_bad_config_is_refused_naming_the_key(key, fix, base):
  config = base()
  fix(config)
  with pytest.raises(validate.ConfigError) as err:
    validate.validate_config(config, num_devices=jax.device_count())
  assert err.value.key == key and key in str(err.value), str(err.value)


def test_the_untouched_configs_pass():
  for c in (lm.get_config("tiny"), lm.get_config("small"), lm.get_config("small,moe"), staged_tiny()):
    assert validate.validate_config(c, num_devices=jax.device_count())


@pytest.mark.slow  # slow tier: runs the CLI in fresh processes
def test_cli_refuses_bad_configs_before_training(tmp_path, data_dir):
  for i, (flag, key) in enumerate([("--config.train.keep_checkpoints=0", "train.keep_checkpoints"),
                                   ("--config.model.top_k=0", "model.top_k"),
                                   ("--config.train.checkpoint_every=0", "train.checkpoint_every")]):
    wd = tmp_path / f"run{i}"
    code, out = cli(wd, data_dir, flag)
    assert code != 0 and key in out and "Traceback" not in out, out[-2000:]
    assert not os.path.exists(wd / "checkpoints"), "nothing may be built or written for a bad config"


# ---------------------------------------------------------------- 2. never save a poisoned state

def test_nan_never_reaches_a_checkpoint(tmp_path, data_dir):
  wd = str(tmp_path / "nan")
  c = train_config(data_dir, steps=4, checkpoint_every=2, eval_every=0, log_every=1, schedule="constant",
                   warmup_steps=0)
  stages.train_and_evaluate(c, wd)
  # The same run continues with a learning rate that overflows float32: the step-5 update makes
  # the parameters infinite while the step-5 loss (of the step-4 parameters) is still finite.
  c = train_config(data_dir, steps=8, checkpoint_every=1, eval_every=0, log_every=1, schedule="constant",
                   warmup_steps=0, lr=1e39)
  with pytest.raises(FloatingPointError) as err:
    stages.train_and_evaluate(c, wd)
  msg = str(err.value)
  assert "parameters" in msg and "at step 5" in msg and msg.endswith(os.path.join(wd, "checkpoints", "4")), msg
  mngr = checkpoint.manager(os.path.join(wd, "checkpoints"), read_only=True)
  assert sorted(mngr.all_steps()) == [2, 4]
  prog = steps.build_program(parts.model_config(c), c.train, parts.make_mesh(c))
  for step in mngr.all_steps():
    state, _, _ = checkpoint.restore(mngr, step, prog.abstract_state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state)), step
  mngr.close()


# ---------------------------------------------------------------- 3. one run per workdir

@pytest.mark.slow  # slow tier: runs the CLI in fresh processes
def test_second_process_on_a_locked_workdir_is_refused(tmp_path, data_dir):
  wd = tmp_path / "shared"
  endless = ["--config.train.steps=100000", "--config.train.log_every=1", "--config.train.eval_every=0",
             "--config.train.checkpoint_every=100000"]
  first = cli(wd, data_dir, *endless, wait=False)
  wait_for(first, "step      1/100000")
  code, out = cli(wd, data_dir, *endless)
  assert code != 0 and f"in use by process {first.pid}" in out, out[-2000:]
  at_refusal = max(r["step"] for r in read_metrics(wd) if "loss" in r)
  first.send_signal(signal.SIGTERM)  # the first run goes on after the refusal, then stops cleanly
  rest, _ = first.communicate(timeout=600)
  assert first.returncode == 0 and "SIGTERM: saved checkpoint" in rest, rest[-2000:]
  steps = [r["step"] for r in read_metrics(wd) if "loss" in r]
  assert steps == list(range(1, len(steps) + 1)) and len(steps) >= at_refusal  # untouched by the second
  saved = [int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()]
  assert saved == [steps[-1]], (saved, steps[-1])
  assert os.path.getsize(wd / ".lock") == 0  # released


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capfd):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / ".lock").write_text(json.dumps({"host": "somewhere", "pid": dead.pid}))  # left by a SIGKILL
  with WorkdirLock(str(tmp_path)):
    assert f"left by process {dead.pid}" in capfd.readouterr().err
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    live = subprocess.run([sys.executable, "-c", "from moegrow.workdir_lock import WorkdirLock; "
                           f"WorkdirLock({str(tmp_path)!r}).acquire()"], capture_output=True, text=True, cwd=REPO)
    assert live.returncode != 0 and f"in use by process {os.getpid()}" in live.stderr, live.stderr[-1000:]
  with WorkdirLock(str(tmp_path)):  # a clean release leaves nothing to take over
    assert "stale" not in capfd.readouterr().err


# ---------------------------------------------------------------- 4. metrics.jsonl through kills

@pytest.mark.slow  # slow tier: runs the CLI in fresh processes
def test_sigkill_then_resume_keeps_each_step_once_and_repairs_a_torn_line(tmp_path, data_dir):
  wd = tmp_path / "killed"
  p = cli(wd, data_dir, "--config.train.steps=16", "--config.train.checkpoint_every=4", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.train.async_checkpoint=False", wait=False)
  wait_for(p, "step      7/16")  # checkpoints 4 exists, rows 5..7 are past it
  p.kill()
  p.wait()
  with open(wd / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "loss": 1.')  # a row torn by the kill
  code, out = cli(wd, data_dir, "--config.train.steps=16", "--config.train.checkpoint_every=4",
                  "--config.train.log_every=1", "--config.train.eval_every=0")
  assert code == 0, out[-2000:]
  assert "removed a torn last line" in out
  rows = read_metrics(wd)  # every line parses
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == list(range(1, 17)), steps


# ---------------------------------------------------------------- 5. SIGTERM during growth

@pytest.mark.slow  # slow tier: runs the CLI in fresh processes
def test_sigterm_during_growth_exits_cleanly_and_the_rerun_finishes(tmp_path, data_dir):
  wd = tmp_path / "grow"
  args = ["--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.checkpoint_every=4",
          "--config.train.steps=8", "--config.stages=({'name': 'dense', 'steps': 4}, {'name': 'moe8', 'steps': 4, "
          "'ops': ({'op': 'upcycle', 'layers': 'every_other', 'num_experts': 8},)})"]
  p = cli(wd, data_dir, *args, config="configs/grow.py:tiny", wait=False)
  wait_for(p, "into stage 1")
  p.send_signal(signal.SIGTERM)
  rest, _ = p.communicate(timeout=600)
  assert p.returncode == 0, rest[-2000:]
  assert "SIGTERM" in rest and "Traceback" not in rest, rest[-2000:]
  src = os.path.join(wd, "checkpoints", "4")
  assert os.path.isdir(src)  # the source is kept; the grown checkpoint is either whole or absent
  code, out = cli(wd, data_dir, *args, config="configs/grow.py:tiny")
  assert code == 0, out[-2000:]
  assert [r["step"] for r in read_metrics(wd) if "loss" in r] == list(range(1, 9))
  assert os.path.isdir(os.path.join(wd, "checkpoints", "stage1_8"))


# ---------------------------------------------------------------- 6. crafted checkpoint files

def _finished_run(tmp_path, data_dir, name):
  wd = str(tmp_path / name)
  stages.train_and_evaluate(train_config(data_dir, steps=2, checkpoint_every=2, eval_every=0, log_every=1), wd)
  return wd


def _json_item(step_dir, item):
  files = [f for f in glob.glob(os.path.join(step_dir, item, "*")) if os.path.isfile(f)]
  for f in files:
    try:
      with open(f) as fh:
        return f, json.load(fh)
    except ValueError:
      continue
  raise AssertionError(f"no JSON file in {step_dir}/{item}: {files}")


def test_crafted_iterator_state_is_refused_quickly_naming_the_path(tmp_path, data_dir):
  wd = _finished_run(tmp_path, data_dir, "iter")
  path, blob = _json_item(os.path.join(wd, "checkpoints", "2"), "data")
  part = next(iter(blob["iterator"]["shards"]["0"]["parts"].values()))  # one domain's stream, by name
  part["pos"] = 10**12  # an absurd offset
  with open(path, "w") as f:
    json.dump(blob, f)
  t0 = time.time()
  with pytest.raises(ValueError) as err:
    stages.train_and_evaluate(train_config(data_dir, steps=4, checkpoint_every=2, eval_every=0), wd)
  assert time.time() - t0 < 120
  assert os.path.join(wd, "checkpoints", "2") in str(err.value) and "pos" in str(err.value), str(err.value)


@pytest.mark.parametrize("field, value, words", [("num_layers", 10**6, "2 blocks"), ("d_model", "64", "d_model")])
def test_crafted_model_metadata_is_refused_quickly_naming_the_path(tmp_path, data_dir, field, value, words):
  wd = _finished_run(tmp_path, data_dir, f"meta_{field}")
  path, blob = _json_item(os.path.join(wd, "checkpoints", "2"), "meta")
  blob["model"][field] = value
  with open(path, "w") as f:
    json.dump(blob, f)
  t0 = time.time()
  with pytest.raises(ValueError) as err:
    stages.grow_offline(staged_config(data_dir), wd, str(tmp_path / f"grown_{field}"))
  assert time.time() - t0 < 120
  assert os.path.join(wd, "checkpoints", "2") in str(err.value) and words in str(err.value), str(err.value)


def staged_config(data_dir):
  c = grow_config.get_config("tiny")
  c.data.data_dir = data_dir
  c.mesh.update(data=1, num_devices=1)
  return c


# ---------------------------------------------------------------- 7. I/O: workdir and corpora

def test_unwritable_workdir_is_refused_naming_the_path(tmp_path, data_dir):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(OSError) as err:
    stages.train_and_evaluate(train_config(data_dir, steps=2), str(blocker / "run"))
  assert str(blocker / "run") in str(err.value) and "GiB free" in str(err.value)


def test_corrupt_corpus_file_names_the_dataset_and_how_to_rebuild(tmp_path, data_dir):
  bad = tmp_path / "tfds"
  shutil.copytree(os.path.join(data_dir, "shakespeare_plays"), bad / "shakespeare_plays")
  (shard,) = glob.glob(str(bad / "shakespeare_plays" / "*" / "*validation.array_record*"))
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) // 3)
  with pytest.raises(ValueError) as err:
    data.eval_batches("shakespeare_plays", seq_len=16, batch_size=2, num_batches=1, data_dir=str(bad))
  msg = str(err.value)
  assert "shakespeare_plays" in msg and str(bad / "shakespeare_plays") in msg and "Delete the folder" in msg, msg
