"""Probes: measurements of a model on fixed data, for logs, certificates and growth ops that
need data (per-domain held-out loss; per-layer expert loads for add_experts' most_loaded; the
diagonal Fisher for EWC; routing choices per domain for routing drift after growth)."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moegrow import sharding
from moegrow.model import layers, moe
from moegrow.model import transformer as tf
from moegrow.train.steps import Program


def domain_losses(program: Program, params, sets: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
  """{domain: {'loss': mean nats/token[, 'bpb': bits per byte]}} over every batch of each domain
  (bits per byte where the batches carry `num_bytes`). Padding tokens do not count."""
  out = {}
  for domain, batches in sets.items():
    nll = count = nbytes = 0.0
    for b in batches:
      s, c = program.eval_step(params, sharding.from_full(b, program.batch_sharding))
      nll, count, nbytes = nll + float(s), count + float(c), nbytes + b.get("num_bytes", 0)
    out[domain] = {"loss": nll / count}
    if nbytes:
      out[domain]["bpb"] = nll / math.log(2) / nbytes
  return out


def evaluate(program: Program, params, sets: dict[str, list[dict]]) -> dict[str, float]:
  """`domain_losses` as flat metrics: eval/<domain>/loss and eval/<domain>/bpb."""
  return {f"eval/{d}/{k}": v for d, m in domain_losses(program, params, sets).items() for k, v in m.items()}


def _replicated_tokens(batches: list[dict], mesh):
  """Every row of `batches` as one token array replicated on `mesh` (readable on every process),
  and that sharding."""
  rows = np.concatenate([b["inputs"] for b in batches])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.make_array_from_callback(rows.shape, replicated, lambda i: rows[i]), replicated


def expert_loads(cfg, params, batches: list[dict], mesh) -> dict[str, list[float]]:
  """Per MoE layer, the fraction of token-expert assignments each expert receives on `batches`
  (the input of add_experts' source='most_loaded')."""
  tokens, replicated = _replicated_tokens(batches, mesh)
  loads = jax.jit(lambda p, t: {i: m["load"] for i, m in tf.apply(cfg, p, t)[1]["layers"].items()},
                  out_shardings=replicated)(params, tokens)
  return {i: np.asarray(v).tolist() for i, v in loads.items()}


def _moe_views(cfg, p, tokens_BT):
  """Per MoE layer {layer: (MLP input x_ND, router logits_NE, every expert's output on every token
  y_END)}, from the layer's own weights, in float32."""
  h = tf.apply(cfg, p, tokens_BT, mlp_inputs=True)[1]["mlp_inputs"]
  act = layers.activation(cfg.mlp_act)
  out = {}
  for i, x_BTD in h.items():
    if not cfg.experts_in_layer(int(i)):
      continue
    m = jax.tree_util.tree_map(lambda w: w.astype(jnp.float32), p["blocks"][str(i)]["mlp"])
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1]).astype(jnp.float32)
    logits_NE = x_ND @ m["router_DE"] + m["router_bias_E"]
    swiglu = m.get("wlin_EDF") is not None

    def expert_out(w):  # one expert's FFN on every token: (wact, [wlin,] wo) -> [N, D]
      h_NF = act(x_ND @ w[0])
      return (h_NF * (x_ND @ w[1]) if swiglu else h_NF) @ w[-1]
    ws = (m["wact_EDF"], m["wlin_EDF"], m["wo_EFD"]) if swiglu else (m["wact_EDF"], m["wo_EFD"])
    out[str(i)] = (x_ND, logits_NE, jax.lax.map(expert_out, ws))
  return out


def _reap_sums(cfg, p, tokens_BT):
  """Per MoE layer: (sum over tokens of gate_e * ||y_e||, tokens routed to e), routed by the
  model's own gating (`moe.top_k_gates`)."""
  out = {}
  for i, (x_ND, logits_NE, y_END) in _moe_views(cfg, p, tokens_BT).items():
    bias_E = p["blocks"][str(i)]["mlp"].get("selection_bias_E")
    _, gate_NK, idx_NK = moe.top_k_gates(logits_NE, cfg.top_k, cfg.gating, bias_E)
    rows = jnp.arange(x_ND.shape[0])[:, None]
    gate_NE = jnp.zeros_like(logits_NE).at[rows, idx_NK].set(gate_NK)
    routed_NE = jnp.zeros_like(logits_NE).at[rows, idx_NK].set(1.0)
    out[i] = (jnp.sum(gate_NE * jnp.linalg.norm(y_END, axis=-1).T, axis=0), jnp.sum(routed_NE, axis=0))
  return out


def reap_scores(cfg, params, batches: list[dict], mesh) -> dict[str, list[float]]:
  """Per MoE layer, each expert's REAP saliency (Lasby et al. 2025, eq. 4): the mean over the tokens
  routed to it of gate_e(x) * ||y_e(x)||_2 on `batches` (0 for an expert no token reaches); the input
  of prune_experts' saliency='reap'."""
  tokens, replicated = _replicated_tokens(batches, mesh)
  sums = jax.jit(functools.partial(_reap_sums, cfg), out_shardings=replicated)(params, tokens)
  return {i: (np.asarray(s, np.float64) / np.maximum(np.asarray(n, np.float64), 1)).tolist()
          for i, (s, n) in sums.items()}


def expert_features(cfg, params, batches: list[dict], mesh) -> dict[str, dict[str, list]]:
  """Per MoE layer, what merge_experts groups experts by: {'output': each expert's mean output over
  every token of `batches` [E, D] (HC-SMoE), 'router': each expert's router logits on those tokens
  (MC-SMoE), as E vectors of length E with the same dot products as the [E, N] logits (so the
  same cosine distances, and a certificate that stays small however many tokens were measured)}."""
  tokens, replicated = _replicated_tokens(batches, mesh)
  views = lambda p, t: {i: (jnp.mean(y_END, axis=1), logits_NE.T @ logits_NE)
                        for i, (_, logits_NE, y_END) in _moe_views(cfg, p, t).items()}
  feats = jax.jit(views, out_shardings=replicated)(params, tokens)
  return {i: {"output": np.asarray(o).tolist(), "router": gram_root(np.asarray(g)).tolist()}
          for i, (o, g) in feats.items()}


def gram_root(gram_EE: np.ndarray) -> np.ndarray:
  """Rows F with F F^T = `gram_EE` (a symmetric positive semi-definite matrix), by its eigen-
  decomposition in float64: vectors with the dot products, hence the cosine distances, of the
  vectors that made the Gram matrix."""
  g = np.asarray(gram_EE, np.float64)
  w, v = np.linalg.eigh((g + g.T) / 2)
  return v * np.sqrt(np.clip(w, 0.0, None))


def _example_nll(cfg, p, x_T, y_T):
  logits_TV = tf.apply(cfg, p, x_T[None])[0][0]
  return optax.softmax_cross_entropy_with_integer_labels(logits_TV, y_T).mean()


@functools.partial(jax.jit, static_argnums=0)
def _squared_grads(cfg, p, x_NT, y_NT):
  """Sum over examples of squared per-example gradients (jax.vmap(jax.grad))."""
  g = jax.vmap(jax.grad(_example_nll, argnums=1), in_axes=(None, None, 0, 0))(cfg, p, x_NT, y_NT)
  return jax.tree_util.tree_map(lambda a: jnp.sum(jnp.square(a.astype(jnp.float32)), axis=0), g)


@functools.partial(jax.jit, static_argnums=0)
def _sample(cfg, p, x, k):
  return jax.random.categorical(k, tf.apply(cfg, p, x)[0], axis=-1)


def fisher_diagonal(cfg, params, batches: list[dict], *, labels: str = "data", key=None) -> dict:
  """Diagonal Fisher information of `params` (EWC, Kirkpatrick et al. 2017, eq. 3's F_i): the mean
  over examples (sequences) of the squared gradient of the example's mean token NLL. Labels:
  'data' (the batch's targets: the empirical Fisher) or 'model' (sampled from the model's own
  predictive distribution with `key`: the true Fisher). Returns a params-shaped float32 tree."""
  if labels not in ("data", "model"):
    raise ValueError(f"fisher_diagonal: labels={labels!r} must be 'data' or 'model'")
  if labels == "model" and key is None:
    raise ValueError("fisher_diagonal: labels='model' samples labels and needs a `key`")

  total, n = None, 0
  for i, b in enumerate(batches):
    x = np.asarray(b["inputs"])  # host data, the same on every process
    y = _sample(cfg, params, x, jax.random.fold_in(key, i)) if labels == "model" else np.asarray(b["targets"])
    sq = _squared_grads(cfg, params, x, y)
    total = sq if total is None else jax.tree_util.tree_map(jnp.add, total, sq)
    n += x.shape[0]
  if not n:
    raise ValueError("fisher_diagonal: no examples")
  return jax.tree_util.tree_map(lambda t: t / n, total)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _choices(cfg, mesh, p, tokens_BT):
  aux = tf.apply(cfg, p, tokens_BT, mlp_inputs=True)[1]
  out = {}
  for i in aux["layers"]:
    r = p["blocks"][i]["mlp"]
    h_ND = aux["mlp_inputs"][i].reshape(-1, cfg.d_model).astype(jnp.float32)
    logits_NE = jnp.einsum("ND,DE->NE", h_ND, r["router_DE"]) + r["router_bias_E"]
    idx_NK = moe.top_k_gates(logits_NE, min(cfg.top_k, logits_NE.shape[-1]), cfg.gating, r.get("selection_bias_E"))[2]
    out[i] = jax.lax.with_sharding_constraint(idx_NK, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return out  # replicated: readable on every process


def router_choices(cfg, params, batches: list[dict], mesh) -> dict[str, np.ndarray]:
  """Per MoE layer, every token's top-k experts [N, K] on `batches` (in order): the router's
  choices on the layer's MLP input, logits h W_router + b in float32 as in the model."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  parts: dict[str, list] = {}
  for b in batches:
    rows = np.asarray(b["inputs"])
    tokens = jax.make_array_from_callback(rows.shape, replicated, lambda i, rows=rows: rows[i])
    for i, idx in _choices(cfg, mesh, params, tokens).items():
      parts.setdefault(i, []).append(np.asarray(idx))
  return {i: np.concatenate(v) for i, v in parts.items()}


def routing_drift(choices_NK: np.ndarray, first_new: int) -> float:
  """The fraction of tokens whose top-k includes a new expert (index >= first_new): how much of
  an old domain's routing moved to experts added by growth."""
  return float(np.mean(np.any(np.asarray(choices_NK) >= first_new, axis=-1)))


def expert_load(choices_NK: np.ndarray, num_experts: int) -> list[float]:
  """The fraction of token-expert assignments each expert receives."""
  counts = np.bincount(np.asarray(choices_NK).reshape(-1), minlength=num_experts)
  return (counts / max(counts.sum(), 1)).tolist()


def routing_report(cfg, params, sets: dict[str, list[dict]], mesh, first_new: dict[str, int]) -> dict:
  """{domain: {layer: {'load': [per-expert fraction], 'drift': fraction or None}}}; `first_new`
  maps a layer to the index of its first expert added by the last growth (layers without old
  experts, e.g. just upcycled from dense, have drift None)."""
  out = {}
  for domain, batches in sets.items():
    choices = router_choices(cfg, params, batches, mesh)
    out[domain] = {i: {"load": expert_load(c, cfg.experts_in_layer(int(i))),
                       "drift": routing_drift(c, first_new[i]) if i in first_new else None}
                   for i, c in choices.items()}
  return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _input_sums(cfg, mesh, p, tokens_BT):
  h = tf.apply(cfg, p, tokens_BT, mlp_inputs=True)[1]["mlp_inputs"]
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return {i: jax.lax.with_sharding_constraint(jnp.sum(x.astype(jnp.float32), axis=(0, 1)), rep) for i, x in h.items()}


def mlp_input_means(cfg, params, sets: dict[str, list[dict]], mesh) -> dict[str, dict[str, np.ndarray]]:
  """{layer: {domain: mean MLP input [D]}} over every token of each domain's batches: the
  centroids from which Branch-Train-MiX's hidden-state router init builds router columns
  (`moegrow.surgery.btx.router_from_centroids`)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  out: dict[str, dict[str, np.ndarray]] = {}
  for domain, batches in sets.items():
    total, count = None, 0
    for b in batches:
      rows = np.asarray(b["inputs"])
      tokens = jax.make_array_from_callback(rows.shape, replicated, lambda i, rows=rows: rows[i])
      sums = {i: np.asarray(v, np.float64) for i, v in _input_sums(cfg, mesh, params, tokens).items()}
      total = sums if total is None else {i: total[i] + sums[i] for i in total}
      count += rows.size
    for i, v in (total or {}).items():
      out.setdefault(i, {})[domain] = (v / count).astype(np.float32)
  return out
