"""Generates notebooks/01_grow_a_model.ipynb, stored executed: outputs and plots included.

  python notebooks/nbmake.py             # rebuild and execute every notebook (see nbmake.py)
  python notebooks/make_01.py            # this one only: build from the cells below, execute, store
  python notebooks/make_01.py --check    # exit 1 if the stored cells differ from the cells below

Edit the cells here, not in the .ipynb. Cells tagged `dense-train` and `certificate` are parsed by
tests/test_notebooks.py: keep their printed formats (`step N  loss X`, `domain  before  after`).
"""
import os
import sys

import nbmake

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "01_grow_a_model.ipynb")

CELLS = [
    ("md", """\
# 01 - Grow a model: dense -> MoE, exactly, with the optimizer state carried

In five minutes: build a tiny dense byte-level LM, train it on the local corpora, **upcycle** every MLP
into a 4-expert top-2 MoE with `moegrow.surgery.apply.apply_ops` (params *and* Adam moments), check the
**growth certificate** (held-out loss before == after), and keep training as an MoE.

The whole API used here is pure functions on plain dicts:

| call | what |
|---|---|
| `transformer.init_params(cfg, seed)` / `apply(cfg, params, tokens)` | params are nested dicts, `apply` returns `(logits, aux)` |
| `steps.lm_loss(cfg, params, batch)` | cross-entropy + MoE aux losses, and per-layer router metrics |
| `surgery.apply_ops(state, cfg, ops, key, shapes=transformer.abstract_params)` | `state = {'params', 'mu', 'nu'}` -> `(state, new_cfg, reports)` |
| `optim.adam_moments` / `with_adam_moments` | take the Adam moments out of an optax state / put grown ones back |

The notebook runs in well under a minute on 2 CPU cores."""),
    ("code", """\
import os
import sys
import tempfile

try:
  import moegrow  # noqa: F401
except ImportError:  # running from notebooks/ without `pip install -e .`
  sys.path.insert(0, os.path.abspath(".."))

import jax
import numpy as np
import optax

from moegrow import data
from moegrow.config import ModelConfig
from moegrow.flops import count_params
from moegrow.model import transformer as tf
from moegrow.surgery import apply as surgery
from moegrow.train import optim
from moegrow.train.steps import lm_loss

print("jax", jax.__version__, "on", jax.default_backend())"""),
    ("md", """\
## 1. A tiny dense model

`ModelConfig` is frozen and holds every shape. Parameters are a plain nested dict; leaf names end in
their axes (`D` model width, `F` MLP hidden, `H` heads, `A` head dim, `V` vocab, later `E` experts)."""),
    ("code", """\
cfg = ModelConfig(d_model=64, num_layers=2, num_heads=2, d_ff=128)
params = tf.init_params(cfg, seed=0)


def tree_shapes(tree):
  \"\"\"{'blocks/0/mlp/wact_DF': (64, 128), ...} for any nested dict of arrays.\"\"\"
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(x.shape)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


for name, shape in tree_shapes(params).items():
  print(f"{name:28s} {shape}")
n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
print(f"\\n{n_params:,} parameters (flops.count_params: {count_params(cfg)})")"""),
    ("md", """\
## 2. Train it on real text

Two local corpora (Shakespeare's plays and the Python standard library, bytes as tokens) are built
as TFDS datasets on first use, in about a second. `MOEGROW_DATA_DIR` points at an existing data dir
(the tests and `notebooks/nbmake.py` set it); otherwise a temporary one is used."""),
    ("code", """\
data_dir = os.environ.get("MOEGROW_DATA_DIR") or tempfile.mkdtemp(prefix="moegrow_data_")
mixture = {"shakespeare_plays": 0.5, "python_stdlib": 0.5}
SEQ_LEN, BATCH = 64, 8
train_it = data.make_train_iter(mixture, seq_len=SEQ_LEN, global_batch=BATCH, seed=0, data_dir=data_dir)
batch = next(train_it)
print({k: v.shape for k, v in batch.items()})
print(repr(data.decode(batch["inputs"][0])))"""),
    ("md", """\
A plain optax AdamW loop. The config is static (it fixes the shapes), so the step function is
built per config and `jax.jit` compiles it once; after growth we build a new one.
(`moegrow.train.steps.build_program` is the sharded version of the same thing used by `moegrow.main`.)"""),
    ("code", """\
DENSE_STEPS, MOE_STEPS = 40, 30
schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=5,
                                              decay_steps=DENSE_STEPS + MOE_STEPS, end_value=1e-3)
tx = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1)


def make_train_step(cfg):
  @jax.jit
  def train_step(params, opt_state, batch):
    grad_fn = jax.value_and_grad(lambda p: lm_loss(cfg, p, batch), has_aux=True)
    (loss, aux), grads = grad_fn(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux
  return train_step


def lm_batch(b):
  return {"inputs": b["inputs"], "targets": b["targets"]}  # drop the 'domain' ids"""),
    ("code", """\
opt_state = tx.init(params)
train_step = make_train_step(cfg)
for step in range(1, DENSE_STEPS + 1):
  params, opt_state, loss, aux = train_step(params, opt_state, lm_batch(next(train_it)))
  if step == 1 or step % 5 == 0:
    print(f"step {step:3d}  loss {float(loss):.4f}")""", ["dense-train"]),
    ("md", """\
## 3. Upcycle: every dense MLP becomes 4 identical experts (top-2)

A growth op maps a state `{'params', 'mu', 'nu'}` to a new one. With `opt_state='carry'` (the
default) each expert copy inherits the dense MLP's Adam moments, so training resumes smoothly.
The report records exactly what happened to every target leaf."""),
    ("code", """\
moments = optim.adam_moments(opt_state)  # {'mu', 'nu', 'count'}
state = {"params": params, "mu": moments["mu"], "nu": moments["nu"]}
ops = [{"op": "upcycle", "layers": "all", "num_experts": 4, "top_k": 2}]
grown, moe_cfg, reports = surgery.apply_ops(state, cfg, ops, jax.random.key(1), shapes=tf.abstract_params)

old, new = tree_shapes(params), tree_shapes(grown["params"])
print("changed leaves (before -> after):")
for name in sorted(old.keys() | new.keys()):
  if old.get(name) != new.get(name):
    print(f"  {name:26s} {str(old.get(name, '-')):>12} -> {new.get(name, '-')}")
print(f"the other {sum(old.get(k) == s for k, s in new.items())} leaves keep their shapes")
print("new config:", {k: getattr(moe_cfg, k) for k in ("moe_layers", "num_experts", "top_k", "gating", "dispatch")})
print("params:", count_params(cfg), "->", count_params(moe_cfg))"""),
    ("code", """\
report = reports[0]
print(f"op={report['op']}  exact={report['exact']}  opt_state={report['opt_state']}")
copies = [t for t, m in report["map"].items() if m["action"] == "copy"]
print(f"source -> target, layer 0 (the {len(copies)} plain copies in the model not shown):")
for target, m in report["map"].items():
  if target.startswith("blocks/0/") and m["action"] != "copy":
    print(f"  {', '.join(m['from']) or '(new)':20s} -> {target:27s} [{m['action']}]")

# The Adam moments were grown like the params: every expert carries the dense MLP's mu.
mu_dense = moments["mu"]["blocks"]["0"]["mlp"]["wact_DF"]
mu_experts = grown["mu"]["blocks"]["0"]["mlp"]["wact_EDF"]
print("each expert's mu == dense mu:", all(np.array_equal(mu_experts[e], mu_dense) for e in range(4)))"""),
    ("md", """\
## 4. The growth certificate

Upcycling with `topk_softmax` gating and dropless dispatch is function-preserving: the top-2 gates
sum to 1 and all experts are equal, so the MoE computes exactly the dense MLP. We measure it: the
held-out loss on one fixed validation batch per domain, before and after growth."""),
    ("code", """\
held = {data.domain_name(n): data.eval_batches(n, seq_len=SEQ_LEN, batch_size=BATCH, num_batches=1,
                                               data_dir=data_dir)[0] for n in mixture}


def held_out_loss(cfg, params):
  loss_fn = jax.jit(lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
      tf.apply(cfg, p, b["inputs"])[0], b["targets"]).mean())
  return {d: float(loss_fn(params, lm_batch(b))) for d, b in held.items()}


before, after = held_out_loss(cfg, params), held_out_loss(moe_cfg, grown["params"])
print(f"{'domain':20s} {'before':>11s} {'after':>11s} {'|change|':>9s}")
for d in before:
  print(f"{d:20s} {before[d]:11.7f} {after[d]:11.7f} {abs(after[d] - before[d]):9.1e}")""", ["certificate"]),
    ("md", """\
## 5. Keep training as an MoE

A fresh optax state of the new shapes gets the grown moments and the step count (so the learning-rate
schedule continues where it was). `lm_loss` returns per-layer router metrics: `load` is the fraction
of routed token slots each expert received (uniform = 1/4); `aux` is the Switch load-balancing
loss summed over the MoE layers (1 per layer when perfectly balanced)."""),
    ("code", """\
params = grown["params"]
opt_state = optim.with_adam_moments(tx.init(params), grown["mu"], grown["nu"], moments["count"])
train_step = make_train_step(moe_cfg)
loads = []
for step in range(DENSE_STEPS + 1, DENSE_STEPS + MOE_STEPS + 1):
  params, opt_state, loss, aux = train_step(params, opt_state, lm_batch(next(train_it)))
  loads.append({layer: np.asarray(m["load"]) for layer, m in aux["moe"].items()})
  if step % 5 == 0:
    print(f"step {step:3d}  loss {float(loss):.4f}  (ce {float(aux['ce']):.4f}, aux {float(aux['aux_loss']):.3f})")

print("\\nper-expert load, mean over the MoE steps:")
for layer in loads[0]:
  mean = np.mean([l[layer] for l in loads], axis=0)
  print(f"  layer {layer}: " + "  ".join(f"e{e} {x:.3f}" for e, x in enumerate(mean)))"""),
    ("md", """\
Next: `add_experts` (4 -> 8), `insert_blocks`, `widen_mlp`, ... are all in `moegrow.surgery.apply.OPS` and
chain in one `apply_ops` call; `moegrow.main` runs the same growth at checkpoint boundaries
(`stages` in the config) and writes each certificate to `<workdir>/growth/`."""),
]


if __name__ == "__main__":
  sys.exit(nbmake.main(["01", *sys.argv[1:]]))
