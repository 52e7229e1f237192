"""The training system end to end on the real corpora (issue: the training system)."""
import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moegrow import checkpoint, data, sharding
from moegrow.orchestrate import parts, stages
from moegrow.train import steps
from _tiny import read_metrics as metrics, train_config as tiny
from moegrow.configs import lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(workdir, data_dir, *overrides, wait=True, config="configs/lm.py:tiny"):
  cmd = [sys.executable, "-m", "moegrow.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", *overrides]
  p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if not wait:
    return p
  out, _ = p.communicate(timeout=300)
  return p.returncode, out


def latest_state(workdir, config):
  cfg = parts.model_config(config)
  program = steps.build_program(cfg, config.train, parts.make_mesh(config))
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), read_only=True)
  step = mngr.latest_step()
  state, meta, data_state = checkpoint.restore(mngr, step, program.abstract_state)
  return step, jax.device_get(state), data_state


def assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # slow tier: runs the CLI in fresh processes
def test_exact_resume_in_a_fresh_process(tmp_path, data_dir):
  n = 20
  straight = tiny(data_dir, steps=2 * n, checkpoint_every=100, eval_every=0, log_every=5)
  stages.train_and_evaluate(straight, str(tmp_path / "a"))
  first = tiny(data_dir, steps=2 * n, checkpoint_every=100, eval_every=0, log_every=5, stop_after_steps=n)
  r = stages.train_and_evaluate(first, str(tmp_path / "b"))
  assert r["step"] == n and r["stopped_early"]
  code, out = cli(tmp_path / "b", data_dir, "--config.mesh.data=1", "--config.mesh.num_devices=1", f"--config.train.steps={2 * n}",
                  "--config.train.eval_every=0", "--config.train.log_every=5", "--config.train.checkpoint_every=100")
  assert code == 0, out
  assert "resumed from" in out and f"at step {n}" in out
  step_a, state_a, data_a = latest_state(tmp_path / "a", straight)
  step_b, state_b, data_b = latest_state(tmp_path / "b", straight)
  assert step_a == step_b == 2 * n
  assert data_a == data_b  # same data order: identical iterator position
  assert_trees_equal(state_a, state_b)
  la = {m["step"]: m["loss"] for m in metrics(tmp_path / "a") if "loss" in m}
  lb = {m["step"]: m["loss"] for m in metrics(tmp_path / "b") if "loss" in m}
  assert la == lb and max(la) == 2 * n


@pytest.mark.slow  # slow tier: runs the CLI in fresh processes
def test_sigterm_saves_exits_zero_and_resumes(tmp_path, data_dir):
  wd = tmp_path / "run"
  p = cli(wd, data_dir, "--config.train.steps=100000", "--config.train.log_every=1",
          "--config.train.checkpoint_every=100000", "--config.train.eval_every=0", wait=False)
  mfile = wd / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (mfile.exists() and len(mfile.read_text().splitlines()) >= 3):
    time.sleep(0.2)
  assert mfile.exists(), "training never started"
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 0, out
  assert "SIGTERM: saved checkpoint" in out
  steps = sorted(int(os.path.basename(d)) for d in glob.glob(str(wd / "checkpoints" / "*")) if os.path.basename(d).isdigit())
  assert len(steps) == 1 and 3 <= steps[0] < 100000
  saved = steps[0]
  code, out = cli(wd, data_dir, f"--config.train.steps={saved + 4}", "--config.train.log_every=1",
                  "--config.train.eval_every=0")
  assert code == 0, out
  assert f"at step {saved}" in out
  after = [m["step"] for m in metrics(wd) if "loss" in m and m["step"] > saved]
  assert after == [saved + 1, saved + 2, saved + 3, saved + 4]


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_data_parallel_step_matches_one_device(data_dir):
  assert len(jax.devices()) == 8
  config = tiny(data_dir)
  cfg = parts.model_config(config).replace(moe_layers="every_other", num_experts=4)
  batch = next(parts.train_iter(config))
  results = []
  for n in (1, 8):
    mesh = sharding.make_mesh({"data": n})
    program = steps.build_program(cfg, config.train, mesh)
    state = program.init(jax.random.key(0))
    state, m = program.train_step(state, steps.to_global(program, batch))
    if n == 8:  # parameters and batch really are spread over 8 devices (replicated params here)
      assert len(state["params"]["embed_VD"].sharding.device_set) == 8
    results.append((float(m["loss"]), jax.device_get(state["params"])))
  (l1, p1), (l8, p8) = results
  assert abs(l1 - l8) <= 1e-5 * abs(l1)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree_util.tree_leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("variant", ["tiny", "small", "small,moe", "pod"])
def test_config_files_load_and_build(variant):
  from moegrow.model import transformer as tf
  c = lm.get_config(variant)
  cfg = parts.model_config(c)
  shapes = jax.eval_shape(lambda: tf.init_params(cfg, 0))
  assert shapes["embed_VD"].shape == (cfg.vocab_size, cfg.d_model)
  if "moe" in variant or variant == "pod":
    assert shapes["blocks"]["1"]["mlp"]["wact_EDF"].shape == (8, cfg.d_model, cfg.expert_d_ff)


@pytest.mark.slow  # slow tier: runs the CLI in fresh processes
def test_cli_runs_tiny_writes_outputs_and_learns(tmp_path, data_dir):
  wd = tmp_path / "run"
  code, out = cli(wd, data_dir)
  assert code == 0, out
  assert "tok/s" in out and "ETA" in out and "bits/byte" in out
  rows = metrics(wd)
  assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0])
  evals = [r for r in rows if "eval/shakespeare_plays/loss" in r]
  assert evals and evals[-1]["step"] == 200
  assert glob.glob(str(wd / "tensorboard" / "events.out.tfevents.*"))
  assert os.path.isdir(wd / "checkpoints" / "200" / "state")
  # Loss goes down on the real corpus: clearly below a unigram byte model fitted on the
  # training split and scored on the same validation batches.
  for name in data.LOCAL_DATASETS:
    it = data.make_train_iter({name: 1.0}, seq_len=256, global_batch=64, seed=0, data_dir=data_dir)
    counts = np.bincount(np.concatenate([next(it)["targets"].ravel() for _ in range(20)]),
                         minlength=data.VOCAB_SIZE) + 1.0
    val = np.concatenate([b["targets"].ravel() for b in data.eval_batches(
        name, seq_len=64, batch_size=8, num_batches=2, data_dir=data_dir)])
    unigram_nats = float(-np.log(counts[val] / counts.sum()).mean())
    loss = evals[-1][f"eval/{name}/loss"]
    assert loss < unigram_nats - 0.3, (name, loss, unigram_nats)


def test_config_errors_name_the_key(tmp_path, data_dir):
  code, out = cli(tmp_path / "x", data_dir, "--config.train.stepz=3")
  assert code != 0 and "stepz" in out
  code, out = cli(tmp_path / "y", data_dir, "--config.train.steps=abc")
  assert code != 0 and "steps" in out
  code, out = cli(tmp_path / "z", data_dir, "--config.model.gating=bogus")
  assert code != 0 and "gating='bogus'" in out


def test_a_zero_weight_domain_is_evaluated_and_never_trained_on(tmp_path, data_dir):
  runs = {}
  for name, mix in (("one", {"shakespeare_plays": 1.0}), ("zero", {"shakespeare_plays": 1.0, "python_stdlib": 0.0})):
    config = tiny(data_dir, steps=3, eval_every=3, eval_batches=1, checkpoint_every=3, log_every=1)
    config.data.mixture = mix
    stages.train_and_evaluate(config, str(tmp_path / name))
    runs[name] = metrics(tmp_path / name)
  train = {k: [(m["step"], m["loss"]) for m in v if "loss" in m] for k, v in runs.items()}
  assert len(train["one"]) == 3 and train["one"] == train["zero"]  # the same batches, the same updates
  evals = {k: [m for m in v if any(key.startswith("eval/") for key in m)][-1] for k, v in runs.items()}
  assert "eval/shakespeare_plays/loss" in evals["one"] and not any("python" in k for k in evals["one"])
  assert evals["zero"]["eval/shakespeare_plays/loss"] == evals["one"]["eval/shakespeare_plays/loss"]
  assert np.isfinite(evals["zero"]["eval/python_stdlib/loss"])


def test_nan_loss_stops_naming_step_and_checkpoint(tmp_path, data_dir):
  config = tiny(data_dir, steps=40, lr=1e30, warmup_steps=0, grad_clip=0.0, checkpoint_every=1, log_every=1,
                eval_every=0)
  with pytest.raises(FloatingPointError, match=r"(loss|gradient norm) is nan at step \d+.*Newest checkpoint \(finite parameters\): .*checkpoints/\d+"):
    stages.train_and_evaluate(config, str(tmp_path / "nan"))


def test_microbatches_accumulate_the_same_update():
  """train.microbatches=4 (gradient accumulation in one step) on 8 devices: the loss and the updated
  params equal one full-batch step (a dense model: the loss is a mean over rows)."""
  c = lm.get_config("tiny")
  c.train.update(batch_size=32, grad_clip=0.0)
  cfg = parts.model_config(c)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 259, (32, 65), dtype=np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  out = {}
  for mb in (1, 4):
    c.train.microbatches = mb
    prog = steps.build_program(cfg, c.train, mesh)
    state, m = prog.train_step(prog.init(jax.random.key(0)), steps.to_global(prog, batch))
    out[mb] = (float(m["loss"]), float(m["grad_norm"]), jax.device_get(state["params"]))
  assert abs(out[4][0] - out[1][0]) <= 1e-5 * out[1][0]
  assert abs(out[4][1] - out[1][1]) <= 1e-4 * out[1][1]
  for a, b in zip(jax.tree_util.tree_leaves(out[4][2]), jax.tree_util.tree_leaves(out[1][2])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_program_is_reused_across_cadence_changes_but_not_across_optimizer_or_seed():
  """Logging, evaluation and checkpoint cadence never reach the compiled steps: changing them reuses
  the Program (no recompilation); the seed, the learning rate or the schedule length do not. The
  seed is the train step's argument: another seed is another Program on the same compiled step."""
  c = lm.get_config("tiny")
  cfg = parts.model_config(c)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  base = steps.build_program(cfg, c.train, mesh)
  c.train.update(log_every=7, eval_every=13, checkpoint_every=5, keep_checkpoints=9, stop_at_step=3)
  assert steps.build_program(cfg, c.train, mesh) is base
  for key, value in (("seed", 1), ("lr", 2e-3), ("steps", 123), ("microbatches", 2)):
    other = lm.get_config("tiny")
    other.train[key] = value
    assert steps.build_program(cfg, other.train, mesh) is not base, key
    assert (steps.build_program(cfg, other.train, mesh).train_step.step is base.train_step.step) == (key == "seed")


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_the_seed_is_data_the_step_is_the_one_it_was():
  """A step with the seed as an argument computes what a step with the seed baked in computes
  (independent reference: the same loss with jax.random.key(seed + 1) as a constant), for two
  seeds on one compiled step, and the two seeds differ where the model draws random numbers."""
  c = lm.get_config("tiny")
  c.model.update(moe_layers="every_other", num_experts=4, top_k=2, router_jitter=0.5)
  cfg = parts.model_config(c)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  toks = np.random.default_rng(0).integers(0, 256, (4, 17), dtype=np.int32)
  losses = {}
  for seed in (0, 5):
    c.train.seed = seed
    prog = steps.build_program(cfg, c.train, mesh)
    state = prog.init(jax.random.key(0))
    batch = steps.to_global(prog, {"inputs": toks[:, :-1], "targets": toks[:, 1:]})
    rng = jax.random.fold_in(jax.random.key(seed + 1), state["step"])
    want, _ = steps.lm_loss(cfg, state["params"], batch, rng)
    _, m = prog.train_step(state, batch)
    assert float(m["loss"]) == pytest.approx(float(want), rel=1e-6), seed
    losses[seed] = float(m["loss"])
  assert losses[0] != losses[5]
