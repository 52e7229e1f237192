"""Many hosts (issue: multi-host): two real processes on loopback, 4 CPU devices each, one
8-device mesh. They train, checkpoint together, resume, match a single-process run on 8 devices,
and checkpoints grow across the two topologies (2 processes -> 1 and 1 -> 2)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moegrow import checkpoint
from moegrow.configs import grow as grow_config, lm
from moegrow.data.corpora import file_lock
from moegrow.orchestrate import parts, stages
from moegrow.train import steps

pytestmark = pytest.mark.slow  # slow tier: two processes on loopback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, STOP = 12, 6  # first invocation stops after STOP steps, the second resumes to STEPS
TRAIN = ("--config.train.log_every=1", f"--config.train.eval_every={STOP}", "--config.train.checkpoint_every=100")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def two_processes(workdir, data_dir, *overrides, config="configs/lm.py:tiny", timeout=240, while_running=None):
  """`python -m moegrow.main` as processes 0 and 1 of one job on loopback; their outputs.
  `while_running(procs)` is called once both are started."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  port, env = free_port(), dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4".strip())
  os.makedirs(workdir, exist_ok=True)
  procs, logs = [], [f"{workdir}.process{i}.log" for i in range(2)]
  try:
    for i, log in enumerate(logs):
      cmd = [sys.executable, "-m", "moegrow.main", f"--config={config}", f"--workdir={workdir}",
             f"--config.data.data_dir={data_dir}", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}", *overrides]
      with open(log, "w") as f:
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.time() + timeout
    if while_running is not None:
      while_running(procs)
    for p in procs:
      p.wait(timeout=max(deadline - time.time(), 1))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
  outs = [open(log).read() for log in logs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-6000:]}"
  return outs


def final_metrics(outs: list[str]) -> dict:
  """Every process's 'final metrics' line; they must agree (bar the timing)."""
  found = []
  for i, out in enumerate(outs):
    m = re.search(rf"final metrics \(process {i} of 2\): (.*)", out)
    assert m, out[-3000:]
    found.append({k: v for k, v in json.loads(m.group(1)).items() if k != "tokens_per_s"})
  assert found[0] == found[1]
  return found[0]


def tiny(data_dir, **train_kw):
  """The single-process twin of the two-process job: 8 devices, the same 2 data shards."""
  c = lm.get_config("tiny")
  c.data.update(data_dir=data_dir, shards=2)
  c.train.update(dict(steps=STEPS, log_every=1, eval_every=STOP, checkpoint_every=100), **train_kw)
  return c


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == list(range(1, STEPS + 1)), steps  # one writer, steps continue after the resume
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def restore(workdir, config, step, prefix=None):
  """(state, data state) of a checkpoint, on this process's mesh of `config`."""
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), read_only=True, step_prefix=prefix)
  cfg = checkpoint.model_config(checkpoint.read_meta(mngr, step))
  program = steps.build_program(cfg, config.train, parts.make_mesh(config))
  state, meta, data_state = checkpoint.restore(mngr, step, program.abstract_state)
  mngr.close()
  return jax.device_get(state), data_state


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, worker_id):
  """Two-process job (stop after STOP steps, resume to STEPS) and its single-process twin; done
  once per session even when both tests of this file land on different xdist workers."""
  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":  # xdist: the workers share the session's base directory
    root = root.parent
  root = root / "multihost"
  os.makedirs(root, exist_ok=True)
  with file_lock(str(root / ".lock")):
    done = root / "done.json"
    if not done.exists():
      two, one = str(root / "two"), str(root / "one")
      shutil.rmtree(two, ignore_errors=True)
      shutil.rmtree(one, ignore_errors=True)
      first = two_processes(two, data_dir, f"--config.train.steps={STEPS}", f"--config.train.stop_after_steps={STOP}",
                            *TRAIN)
      second = two_processes(two, data_dir, f"--config.train.steps={STEPS}", *TRAIN)
      r1 = stages.train_and_evaluate(tiny(data_dir, stop_after_steps=STOP), one)
      r2 = stages.train_and_evaluate(tiny(data_dir), one)
      assert (r1["step"], r2["step"]) == (STOP, STEPS)
      single = {k: v for k, v in r2.items() if isinstance(v, float) and k != "tokens_per_s"}
      with open(done, "w") as f:
        json.dump({"two": two, "one": one, "outs": [first, second], "single": single}, f)
    with open(done) as f:
      return json.load(f)


def test_two_processes_train_checkpoint_resume_and_match_one_process(runs, data_dir):
  assert jax.process_count() == 1 and len(jax.devices()) == 8  # the twin ran here, on 8 devices
  (first, second), two, one = runs["outs"], runs["two"], runs["one"]
  assert final_metrics(first)["step"] == STOP
  # Saved together: both processes wrote their part of the checkpoint; every shard's data position.
  ck = os.path.join(two, "checkpoints", str(STOP))
  assert sorted(os.listdir(os.path.join(ck, "state", "array_metadatas"))) == ["process_0", "process_1"]
  with open(os.path.join(ck, "data", "metadata")) as f:
    assert sorted(json.load(f)["iterator"]["shards"]) == ["0", "1"]
  assert f"resumed from {ck} at step {STOP}" in second[0]
  final = final_metrics(second)
  assert final["step"] == STEPS and not final["stopped_early"]
  # Same losses at every step, same validation losses, same parameters and data position as the
  # single-process run (the same 8-device mesh and global batches, reductions in another order).
  l2, l1 = losses(two), losses(one)
  for s in l1:
    assert abs(l2[s] - l1[s]) <= 1e-5 * abs(l1[s]), (s, l2[s], l1[s])
  for k, v in runs["single"].items():
    assert abs(final[k] - v) <= 1e-5 * abs(v), (k, final[k], v)
  config = tiny(data_dir)
  s2, d2 = restore(two, config, STEPS)
  s1, d1 = restore(one, config, STEPS)
  assert d2 == d1 and int(s2["step"]) == int(s1["step"]) == STEPS
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s2), jax.tree_util.tree_leaves(s1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def grow_tiny(data_dir, **mesh):
  c = grow_config.get_config("tiny")
  c.data.data_dir = data_dir
  c.mesh.update(mesh)
  return c


def test_growth_across_topologies(runs, data_dir, tmp_path):
  # 2 processes -> 1: the two-process checkpoint grows (dense -> E=8, grow.py:tiny's upcycle stage)
  # onto this process's 8 devices, experts sharded 4 ways.
  c = grow_tiny(data_dir, data=2, expert=4)
  cert = stages.grow_offline(c, os.path.join(runs["two"], "checkpoints", str(STEPS)), str(tmp_path / "g1"))
  assert cert["step"] == STEPS and [o["op"] for o in cert["ops"]] == ["upcycle"]
  assert all(abs(v) < 1e-5 for v in cert["loss_change"].values()), cert["loss_change"]
  grown, _ = restore(str(tmp_path / "g1"), c, STEPS, prefix="stage1")
  assert grown["params"]["blocks"]["1"]["mlp"]["wact_EDF"].shape[0] == 8
  # 1 process -> 2: the single-process checkpoint, in a two-process job whose config grows at
  # that step (the same upcycle stage), then trains the grown model 2 steps on the next batches.
  wd = str(tmp_path / "g2")
  shutil.copytree(os.path.join(runs["one"], "checkpoints"), os.path.join(wd, "checkpoints"))
  stage_specs = ({"name": "dense", "steps": STEPS}, dict(grow_config.get_config("tiny").stages[1], steps=2))
  outs = two_processes(wd, data_dir, f"--config.stages={stage_specs!r}", f"--config.train.steps={STEPS + 2}",
                       "--config.train.log_every=1", "--config.train.eval_every=0", "--config.mesh.expert=4",
                       config="configs/grow.py:tiny")
  assert f"growth certificate @ step {STEPS}" in outs[0]
  with open(os.path.join(wd, "growth", f"{STEPS}.json")) as f:
    cert2 = json.load(f)
  assert all(abs(v) < 1e-5 for v in cert2["loss_change"].values()), cert2["loss_change"]
  final = final_metrics(outs)
  assert (final["stage"], final["step"]) == (1, STEPS + 2) and np.isfinite(final["loss"])
  assert os.path.isdir(os.path.join(wd, "checkpoints", f"stage1_{STEPS + 2}", "state"))
  # Both sources are the same model (test above): the same held-out losses on either topology.
  for d, v in cert["loss_before"].items():
    assert abs(cert2["loss_before"][d] - v) <= 1e-5 * abs(v), (d, cert2["loss_before"][d], v)


def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path, data_dir):
  wd = str(tmp_path / "run")
  mfile = os.path.join(wd, "metrics.jsonl")

  def preempt_process_1(procs):
    deadline = time.time() + 180
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if os.path.exists(mfile) and len(open(mfile).read().splitlines()) >= 3:
        break
      time.sleep(0.2)
    assert os.path.exists(mfile), "training never started"
    procs[1].send_signal(signal.SIGTERM)  # not the coordinator, not the process that logs

  outs = two_processes(wd, data_dir, "--config.train.steps=100000", "--config.train.log_every=1",
                       "--config.train.checkpoint_every=100000", "--config.train.eval_every=0",
                       while_running=preempt_process_1)
  final = final_metrics(outs)  # both processes stopped at the same step, preempted
  assert final["preempted"] and 3 <= final["step"] < 100000
  assert "SIGTERM: saved checkpoint" in outs[0] and all("preempted: checkpoint saved" in o for o in outs)
  assert os.listdir(os.path.join(wd, "checkpoints")) == [str(final["step"])]
  state, data_state = restore(wd, lm.get_config("tiny"), final["step"])
  assert int(state["step"]) == final["step"] and sorted(data_state["shards"]) == ["0", "1"]
