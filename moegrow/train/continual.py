"""Regularisers against forgetting in continual pre-training.

EWC (Kirkpatrick et al. 2017): a quadratic penalty pulling each parameter towards its value at the
end of an earlier stage, weighted by its diagonal Fisher information (measured by
`moegrow.train.probes.fisher_diagonal`); online EWC (Schwarz et al. 2018) keeps one running
Fisher across stages. Fisher and anchor are params-shaped trees; through growth they are remapped
by the op's own rules (`moegrow.surgery.apply.remap`: the Fisher like a second moment, so new
slices get 0 and copies carry their source's values; the anchor like the params).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ewc_penalty(params, fisher, anchor, weight: float) -> jax.Array:
  """weight/2 * sum_i F_i (theta_i - theta*_i)^2 (Kirkpatrick et al. 2017, eq. 3), in float32."""
  terms = jax.tree_util.tree_map(
      lambda p, f, a: jnp.sum(f.astype(jnp.float32) * jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))),
      params, fisher, anchor)
  return 0.5 * weight * sum(jax.tree_util.tree_leaves(terms), jnp.zeros((), jnp.float32))


def online_fisher(old, new, gamma: float):
  """F <- gamma * F_old + F_new (online EWC, Schwarz et al. 2018, section 3); `old` may be None."""
  if old is None:
    return new
  return jax.tree_util.tree_map(lambda o, n: gamma * o + n, old, new)


def distill_kl(teacher_BTV, student_BTV, temperature: float = 1.0) -> jax.Array:
  """Per-token KL(teacher_T || student_T) of temperature-softened distributions (Hinton et al.
  2015): sum_v p_T (log p_T - log q_T), in float32. Zero where the two logits agree."""
  t = jnp.float32(temperature)
  logp_BTV = jax.nn.log_softmax(teacher_BTV.astype(jnp.float32) / t, axis=-1)
  logq_BTV = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / t, axis=-1)
  return jnp.sum(jnp.exp(logp_BTV) * (logp_BTV - logq_BTV), axis=-1)
