"""Branch-Train-MiX (Sukhbaatar et al. 2024): N dense branches of one seed model become one MoE.

    mix(branches, cfg, key, shapes=..., layers=, top_k=, routers=) -> (params, new_cfg, report)

In each chosen layer, branch e's MLP becomes expert e; every other parameter (attention,
embeddings, norms, the MLPs of layers left dense) is the branches' mean (BTX section 2.2). The
new config is `upcycle`'s with E = N and renormalised top-k gating ('topk_softmax'), so N
identical branches give exactly the seed model (it is sparse upcycling then). Routers start
random (N(0, router_std)) or from `routers` {layer: router_DE}, e.g. `router_from_centroids`
of per-domain mean MLP inputs (mergekit-moe's 'hidden' gate mode), measured by the caller.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from moegrow.config import ModelConfig
from moegrow.surgery.apply import Shapes, apply_ops
from moegrow.surgery.merge import check_models, merge
from moegrow.surgery.op import resolve_layers
from moegrow.trees import check_tree, flatten, unflatten

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


def mix(branches: Sequence[Mapping], cfg: ModelConfig, key, *, shapes: Shapes, layers: Any = "all",
        top_k: int = 2, router_std: float | None = None,
        routers: Mapping[Any, Any] | None = None) -> tuple[dict, ModelConfig, dict]:
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
  op = {"op": "upcycle", "layers": ids, "num_experts": n, "top_k": min(top_k, n), "gating": "topk_softmax"}
  if router_std is not None:
    op["router_std"] = router_std
  grown, new_cfg, reports = apply_ops({"params": mean}, cfg, [op], key, shapes=shapes)
  out = flatten(grown["params"])
  for i in ids:
    for dense, expert in MLP_TO_EXPERT.items():
      src = f"blocks/{i}/mlp/{dense}"
      if src in flat[0]:
        dst = f"blocks/{i}/mlp/{expert}"
        out[dst] = jnp.stack([f[src] for f in flat]).astype(out[dst].dtype)  # branch e -> expert e
    given = (routers or {}).get(i, (routers or {}).get(str(i)))
    if given is not None:
      path = f"blocks/{i}/mlp/router_DE"
      given = jnp.asarray(given, out[path].dtype)
      if given.shape != out[path].shape:
        raise ValueError(f"btx.mix: routers[{i}] has shape {given.shape}, {path} needs {out[path].shape}")
      out[path] = given
  params = unflatten(out)
  check_tree(params, shapes(new_cfg), "btx.mix result")
  report = {"op": "btx.mix", "branches": n, "layers": ids, "top_k": min(top_k, n),
            "router": "given" if routers else "random", "upcycle": reports[0]["map"]}
  return params, new_cfg, report
