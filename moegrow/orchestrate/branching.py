"""Branch-Train-MiX as one config (Sukhbaatar et al. 2024): seed -> N branches -> mix -> MoE.

    python -m moegrow.btx --config=<run config with a `btx` section> --workdir=<new dir>

config.btx:
  seed        the seed model's checkpoint: a run's workdir, its checkpoints dir or one step's dir
  branches    [dict(name=, mixture={domain: weight}, steps=, train={overrides})], 2 or more
  layers      the MLP layers that become MoE layers ('all', 'every_other', [ids]); default 'all'
  top_k       experts per token of the mixed MoE (default 2); gating: 'topk_softmax' (default,
              renormalised: N identical branches give the seed model) or 'softmax_topk'
  router      'hidden' (default): router column e is branch e's centroid of the layer's MLP
              inputs minus the mean of the other branches' centroids, L2-normalised (mergekit-moe's
              'hidden' gate mode), with biases -m . col_e (m: the mean centroid) so the boundary
              lies halfway between the centroids; a branch's centroid is the mixture-weighted mean
              of its domains' validation-token means, measured on the branches' average (the mixed
              model before its MLPs become experts); 'random': N(0, router_std), zero biases
The config's `model` is the seed's (dense); its `data.mixture` and `train` are the mixed MoE's
training, from step 0 with a fresh optimizer state (BTX section 2.3).
Layout: `<workdir>/branches/<name>/` is branch <name>'s ordinary run, started from a copy of the
seed checkpoint (step S) and trained to S + steps on its own mixture; `<workdir>` is the MoE's
run: step 0 is the mix (certificate `<workdir>/btx.json`: per-domain loss of the seed, every
branch and the mix, routing per domain, the source -> target path map), then ordinary training
(`moegrow.main` with `mixed_run_config(config)` resumes it too). Rerunning the command skips
finished branches and an existing mix and resumes whatever was interrupted; the seed is only read.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from moegrow import checkpoint
from moegrow.model import transformer as tf
from moegrow.orchestrate import merging, parts, stages
from moegrow.params.trees import to_plain
from moegrow.surgery import btx
from moegrow.surgery import merge as merge_ops
from moegrow.surgery.op import resolve_layers
from moegrow.train import probes
from moegrow.train.logbook import print_table
from moegrow.train.steps import build_program
from moegrow.workdir_lock import WorkdirLock

DEFAULTS = dict(seed="", branches=(), layers="all", top_k=2, gating="topk_softmax", router="hidden",
                router_std=None)


def spec(config) -> dict[str, Any]:
  """The `btx` section with defaults, checked: errors name the field."""
  given = to_plain(config.btx)
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.btx: unknown field(s) {unknown}; known: {sorted(DEFAULTS)}")
  s = dict(DEFAULTS, **given)
  if not s["seed"]:
    raise ValueError("config.btx.seed is empty: name the seed model's checkpoint")
  branches = [dict(b) for b in s["branches"]]
  if len(branches) < 2:
    raise ValueError(f"config.btx.branches: need 2 or more branches, got {len(branches)}")
  names = [b.get("name", "") for b in branches]
  for i, b in enumerate(branches):
    bad = sorted(set(b) - {"name", "mixture", "steps", "train"})
    if bad or not b.get("name") or not b.get("mixture") or int(b.get("steps", 0)) <= 0:
      raise ValueError(f"config.btx.branches[{i}] = {b}: needs name, mixture (non-empty) and steps > 0"
                       + (f" (unknown: {bad})" if bad else ""))
  if len(set(names)) != len(names):
    raise ValueError(f"config.btx.branches: names must be unique, got {names}")
  if s["router"] not in ("hidden", "random"):
    raise ValueError(f"config.btx.router={s['router']!r}: expected 'hidden' or 'random'")
  if config.get("stages"):
    raise ValueError("config.stages: a btx config trains one mixed model; grow it later from its checkpoint")
  s["branches"] = branches
  return s


def _without_btx(config) -> ml_collections.ConfigDict:
  d = config.to_dict()
  d.pop("btx", None)
  return ml_collections.ConfigDict(d)


def branch_config(config, branch: dict, seed_step: int) -> ml_collections.ConfigDict:
  """Branch `branch`'s run: the seed model continued to seed_step + steps on its mixture."""
  c = _without_btx(config)
  c.data.mixture = ml_collections.ConfigDict(dict(branch["mixture"]))
  c.train.update(dict(branch.get("train") or {}))
  c.train.steps = int(seed_step) + int(branch["steps"])
  c.train.stop_at_step = 0  # the config's stop_at_step is a step of the MoE's run
  return c


def mixed_run_config(config) -> ml_collections.ConfigDict:
  """The mixed MoE's run config: the config with the model `btx.mix` produces."""
  s = spec(config)
  c = _without_btx(config)
  cfg = btx.mixed_config(parts.model_config(config), len(s["branches"]), s["layers"], s["top_k"], s["gating"])
  c.model = ml_collections.ConfigDict(cfg.to_dict())
  return c


def branch_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "branches", name)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def btx_run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Branch, train, mix and train the MoE (see the module docstring). Returns the MoE run's final
  metrics with `btx` (the mix certificate); a preempted or stopped branch returns its result."""
  s = spec(config)
  moe_config = mixed_run_config(config)
  stages.prepare(moe_config, workdir)
  seed_dir, prefix, seed_step = checkpoint.locate(s["seed"])
  mngr = checkpoint.manager(seed_dir, read_only=True, step_prefix=prefix)
  try:
    seed_cfg = checkpoint.model_config(checkpoint.read_meta(mngr, seed_step))
    seed_step_dir = checkpoint.step_dir(mngr, seed_step)
  finally:
    mngr.close()
  if seed_cfg != parts.model_config(config):
    raise ValueError(f"btx: the seed checkpoint {seed_step_dir} holds a different model than config.model: "
                     f"{parts.config_diff(seed_cfg, parts.model_config(config))}")
  for b in s["branches"]:
    wd = branch_dir(workdir, b["name"])
    if jax.process_index() == 0:
      os.makedirs(wd, exist_ok=True)
      checkpoint.seed_workdir(seed_step_dir, wd, seed_step)
    _sync(f"btx seed {b['name']}")
    print(f"[btx] branch {b['name']}: {dict(b['mixture'])}, steps {seed_step} -> {seed_step + int(b['steps'])} "
          f"in {wd}", flush=True)
    r = stages.train_and_evaluate(branch_config(config, b, seed_step), wd)
    if r.get("preempted") or r.get("stopped_early"):
      return dict(r, btx_stopped_in=b["name"])
  cert = mix_into(config, workdir, s, seed_step_dir)
  return dict(stages.train_and_evaluate(moe_config, workdir), btx=cert)


def branch_centroids(means: dict, mixtures: list[dict], layers) -> dict[int, np.ndarray]:
  """{layer: [N, D]}: branch e's centroid = its mixture-weighted mean of per-domain MLP-input
  means (`probes.mlp_input_means` output `means[layer][domain]`)."""
  out = {}
  for i in layers:
    layer = means.get(i, means.get(str(i)))
    rows = []
    for mix in mixtures:
      w = {d: float(v) for d, v in mix.items() if float(v) > 0}
      rows.append(sum(w[d] * np.asarray(layer[d], np.float64) for d in w) / sum(w.values()))
    out[i] = np.stack(rows).astype(np.float32)
  return out


def mix_into(config, workdir: str, s: dict, seed_step_dir: str) -> dict[str, Any]:
  """Restore the finished branches, mix them (`moegrow.surgery.btx.mix`), save step 0 of the MoE
  run with a fresh optimizer state, write `<workdir>/btx.json`. Returns the certificate."""
  cfg = parts.model_config(config)
  moe_config = mixed_run_config(config)
  tr, mesh = moe_config.train, parts.make_mesh(moe_config)
  branches = s["branches"]
  with WorkdirLock(workdir, enabled=jax.process_index() == 0):
    out = parts.manager(workdir, 0, tr)
    try:
      if out.latest_step() is not None:
        with open(os.path.join(workdir, "btx.json")) as f:
          return json.load(f)
      seed_step = checkpoint.locate(seed_step_dir)[2]
      params = [merging.restore_params(branch_dir(workdir, b["name"]), mesh,
                                       branch_config(config, b, seed_step).train)[0] for b in branches]
      domains = list(dict.fromkeys(d for b in branches for d in b["mixture"]))
      evals = parts.eval_sets(moe_config, domains)
      layers = resolve_layers(cfg, s["layers"], "btx.mix")
      routers = biases = None
      if s["router"] == "hidden":
        average = merge_ops.merge("linear", params)
        means = probes.mlp_input_means(cfg, average, evals, mesh)
        del average
        centroids = branch_centroids(means, [b["mixture"] for b in branches], layers)
        routers = {i: btx.router_from_centroids(c) for i, c in centroids.items()}
        biases = {i: btx.router_bias_from_centroids(c, routers[i]) for i, c in centroids.items()}
      key = parts.growth_key(int(tr.seed), 0)
      mixed, new_cfg, report = btx.mix(params, cfg, key, shapes=tf.abstract_params, layers=layers,
                                       top_k=s["top_k"], router_std=s["router_std"], routers=routers,
                                       router_biases=biases, gating=s["gating"])
      if new_cfg != parts.model_config(moe_config):
        raise ValueError(f"btx: the mix gives {parts.config_diff(new_cfg, parts.model_config(moe_config))}")
      dense = build_program(cfg, tr, mesh)
      seed_params = merging.restore_params(seed_step_dir, mesh, tr)[0]
      losses = {"seed": {d: v["loss"] for d, v in probes.domain_losses(dense, seed_params, evals).items()}}
      del seed_params
      for b, p in zip(branches, params):
        losses[f"branch {b['name']}"] = {d: v["loss"] for d, v in probes.domain_losses(dense, p, evals).items()}
      del params
      program = build_program(new_cfg, tr, mesh)
      state = merging.fresh_state(program, mixed)
      losses["mix"] = {d: v["loss"] for d, v in probes.domain_losses(program, state["params"], evals).items()}
      routing = probes.routing_report(new_cfg, state["params"], evals, mesh, {})
      entry = {"btx": {"seed": seed_step_dir, "branches": [branch_dir(workdir, b["name"]) for b in branches],
                       "layers": layers, "top_k": s["top_k"], "gating": s["gating"], "router": s["router"]}}
      checkpoint.save(out, 0, state, {"model": new_cfg.to_dict(), "stage": 0, "lineage": [entry]}, None)
      out.wait_until_finished()
    finally:
      out.close()
  cert = dict(entry["btx"], losses=losses, routing={d: {str(i): v["load"] for i, v in r.items()}
                                                    for d, r in routing.items()},
              path_map=report["map"])
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, "btx.json"), cert)
    print_table([{"model": k, **v} for k, v in losses.items()], ["model"] + domains)
  return cert
