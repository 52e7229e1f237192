"""Branch-Train-MiX (Sukhbaatar et al. 2024): N dense branches of one seed model become one MoE.

    mix(branches, cfg, key, shapes=..., layers=, top_k=, routers=) -> (params, new_cfg, report)

In each chosen layer, branch e's MLP becomes expert e; every other parameter (attention,
embeddings, norms, the MLPs of layers left dense) is the branches' mean (BTX section 2.2). The
new config is `upcycle`'s with E = N and by default renormalised top-k gating ('topk_softmax'),
so N identical branches give exactly the seed model (it is sparse upcycling then); 'softmax_topk'
(top-1 of 2 experts, say) keeps a gradient to the router but scales outputs by the gate. Routers start
random (N(0, router_std)) or from `routers` {layer: router_DE} (and `router_biases` {layer:
bias_E}), e.g. `router_from_centroids` / `router_bias_from_centroids` of per-domain mean MLP
inputs (mergekit-moe's 'hidden' gate mode, centred), measured by the caller.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from moegrow.config import ModelConfig
from moegrow.params.trees import check_tree, flatten, unflatten
from moegrow.surgery.apply import Shapes, apply_ops, grown_config
from moegrow.surgery.merge import check_models, merge
from moegrow.surgery.op import resolve_layers

MLP_TO_EXPERT = {"wact_DF": "wact_EDF", "wlin_DF": "wlin_EDF", "wo_FD": "wo_EFD"}


def router_from_centroids(centroids_ND) -> jnp.ndarray:
  """Router columns from per-domain centroids (one row per expert's domain): column e is
  c_e - mean_{j != e} c_j, L2-normalised, so a token near domain e's mean scores highest on e."""
  c = jnp.asarray(centroids_ND, jnp.float32)
  n = c.shape[0]
  if n < 2:
    raise ValueError(f"router_from_centroids: need 2 or more domains, got {n}")
  others = (jnp.sum(c, axis=0, keepdims=True) - c) / (n - 1)
  cols = c - others
  cols = cols / jnp.maximum(jnp.linalg.norm(cols, axis=1, keepdims=True), 1e-8)
  return cols.T  # [D, E]


def router_bias_from_centroids(centroids_ND, router_DE) -> jnp.ndarray:
  """Router biases b_e = -m . col_e, m the mean centroid: every logit is equal at m, so the
  decision boundary between two experts passes halfway between their domains' centroids rather
  than through the origin (centroids of one model's hidden states point in similar directions)."""
  m_D = jnp.mean(jnp.asarray(centroids_ND, jnp.float32), axis=0)
  return -(m_D @ jnp.asarray(router_DE, jnp.float32))  # [E]


def mix_op(n: int, layers: Any = "all", top_k: int = 2, router_std: float | None = None,
           gating: str = "topk_softmax") -> dict:
  """The `upcycle` op that gives the mixed model's config: E = n experts, top-k `gating`."""
  op = {"op": "upcycle", "layers": layers, "num_experts": n, "top_k": min(top_k, n), "gating": gating}
  if router_std is not None:
    op["router_std"] = router_std
  return op


def mixed_config(cfg: ModelConfig, n: int, layers: Any = "all", top_k: int = 2,
                 gating: str = "topk_softmax") -> ModelConfig:
  """The config `mix` returns for n branches of `cfg` (no arrays: from the arguments alone)."""
  return grown_config(cfg, [mix_op(n, resolve_layers(cfg, layers, "btx.mix"), top_k, gating=gating)])


def mix(branches: Sequence[Mapping], cfg: ModelConfig, key, *, shapes: Shapes, layers: Any = "all",
        top_k: int = 2, router_std: float | None = None, routers: Mapping[Any, Any] | None = None,
        router_biases: Mapping[Any, Any] | None = None, gating: str = "topk_softmax") -> tuple[dict, ModelConfig, dict]:
  """Mix N dense branches (params trees of `cfg`) into one MoE (see the module docstring)."""
  n = len(branches)
  if n < 2:
    raise ValueError(f"btx.mix: need 2 or more branches, got {n}")
  flat = check_models(branches)
  ids = resolve_layers(cfg, layers, "btx.mix")
  moe = [i for i in ids if cfg.experts_in_layer(i)]
  if moe:
    raise ValueError(f"btx.mix: layer(s) {moe} are already MoE; mix takes dense branches")
  mean = merge("linear", branches)
  grown, new_cfg, _ = apply_ops({"params": mean}, cfg, [mix_op(n, ids, top_k, router_std, gating)], key, shapes=shapes)
  out = flatten(grown["params"])
  path_map = {p: f"mean of branches 0-{n - 1}: {p}" for p in out if p in flat[0]}
  for i in ids:
    for dense, expert in MLP_TO_EXPERT.items():
      src = f"blocks/{i}/mlp/{dense}"
      if src in flat[0]:
        dst = f"blocks/{i}/mlp/{expert}"
        out[dst] = jnp.stack([f[src] for f in flat]).astype(out[dst].dtype)  # branch e -> expert e
        path_map[dst] = [f"branch {e}: {src}" for e in range(n)]
    given = (routers or {}).get(i, (routers or {}).get(str(i)))
    if given is not None:
      path = f"blocks/{i}/mlp/router_DE"
      given = jnp.asarray(given, out[path].dtype)
      if given.shape != out[path].shape:
        raise ValueError(f"btx.mix: routers[{i}] has shape {given.shape}, {path} needs {out[path].shape}")
      out[path] = given
    bias = (router_biases or {}).get(i, (router_biases or {}).get(str(i)))
    if bias is not None:
      path = f"blocks/{i}/mlp/router_bias_E"
      bias = jnp.asarray(bias, out[path].dtype)
      if bias.shape != out[path].shape:
        raise ValueError(f"btx.mix: router_biases[{i}] has shape {bias.shape}, {path} needs {out[path].shape}")
      out[path] = bias
    for p in out:
      if p.startswith(f"blocks/{i}/mlp/router") or p.startswith(f"blocks/{i}/mlp/shared"):
        path_map.setdefault(p, "given" if (given is not None and p.endswith("router_DE"))
                            or (bias is not None and p.endswith("router_bias_E")) else "new")
  params = unflatten(out)
  check_tree(params, shapes(new_cfg), "btx.mix result")
  report = {"op": "btx.mix", "branches": n, "layers": ids, "top_k": min(top_k, n),
            "router": "given" if routers else "random", "map": path_map}
  return params, new_cfg, report
