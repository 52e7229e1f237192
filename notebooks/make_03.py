"""Generates notebooks/03_merge_and_mix.ipynb, stored executed: outputs and plots included.

  python notebooks/nbmake.py             # rebuild and execute every notebook (see nbmake.py)
  python notebooks/make_03.py            # this one only: build from the cells below, execute, store
  python notebooks/make_03.py --check    # exit 1 if the stored cells differ from the cells below

Edit the cells here, not in the .ipynb. Cells tagged `soup`, `ties`, `merge-run` and `btx` are
parsed by tests/test_notebooks.py: keep their printed formats.
"""
import os
import sys

import nbmake

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "03_merge_and_mix.ipynb")

CELLS = [
    ("md", """\
# 03 - Merge and mix: model soups, TIES and Branch-Train-MiX

One tiny dense model (the **base**) learns English (Shakespeare) and Python; four fine-tunes of it
follow. Then three ways to combine fine-tunes with no further training:

* **model soups** (Wortsman et al. 2022): average the weights of fine-tunes of one base;
* **task vectors** merged by task arithmetic (Ilharco et al. 2023), **TIES** (Yadav et al. 2023) and
  **DARE** (Yu et al. 2023);
* **Branch-Train-MiX** (Sukhbaatar et al. 2024): domain fine-tunes become the experts of one MoE.

Runs are ordinary `moegrow` runs; merging and mixing are pure functions on params trees
(`moegrow.surgery.merge`, `moegrow.surgery.btx`) measured with `moegrow.train.probes`. About two minutes
on 2 CPU cores. The stored outputs show the runs' temporary directory as `<root>` and elide the training log's
wall-clock throughput and ETA (`…`), which differ every run."""),
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
from IPython.display import Image, display

from moegrow.configs import lm
from moegrow.model import transformer as tf
from moegrow.orchestrate import merging, parts, stages
from moegrow.surgery import btx
from moegrow.surgery.merge import greedy_soup, merge
from moegrow.train import probes
from moegrow.train.steps import build_program

data_dir = os.environ.get("MOEGROW_DATA_DIR") or tempfile.mkdtemp(prefix="moegrow_data_")
root = tempfile.mkdtemp(prefix="moegrow_merge_")  # every run's workdir; <root> in the stored outputs
print("jax", jax.__version__, "on", jax.default_backend())"""),
    ("md", """\
## 1. A base and four fine-tunes

The base trains 80 steps on the 50/50 mixture. A fine-tune's config repeats the base stage and adds a
30-step stage with its own data; the learning rate is constant after warm-up, so each fine-tune's rate is
its own. `stages.grow_offline` writes the base's final checkpoint as the fine-tune's first (stage 1 has no
ops: the same model, its Adam moments and data position), and `train_and_evaluate` trains on from there:
the base is trained once. Two fine-tunes are specialists (English only, Python only), two see the mixture
at different learning rates."""),
    ("code", """\
ENGLISH, PYTHON = "shakespeare_plays", "python_stdlib"
DOMAINS = (ENGLISH, PYTHON)
BASE = dict(name="base", steps=80)  # the tiny config's mixture: 50% English, 50% Python


def make(mixture=None, lr=1e-2):
  c = lm.get_config("tiny")
  c.data.data_dir = data_dir
  c.mesh.update(data=1, num_devices=1)
  c.train.update(steps=0, lr=lr, schedule="constant", warmup_steps=10, log_every=40, eval_every=1000,
                 eval_batches=8, checkpoint_every=1000)
  c.stages = (BASE,) if mixture is None else (BASE, dict(name="finetune", steps=30, mixture=mixture))
  return c


FINETUNES = {"english": ({ENGLISH: 1.0}, 3e-3), "python": ({PYTHON: 1.0}, 3e-3),
             "mix@3e-3": ({ENGLISH: 0.5, PYTHON: 0.5}, 3e-3), "mix@1e-2": ({ENGLISH: 0.5, PYTHON: 0.5}, 1e-2)}
runs = {"base": os.path.join(root, "base")}
stages.train_and_evaluate(make(), runs["base"])
for name, (mixture, lr) in FINETUNES.items():
  print(f"=== {name}")
  runs[name] = os.path.join(root, name)
  stages.grow_offline(make(mixture, lr), runs["base"], runs[name])
  stages.train_and_evaluate(make(mixture, lr), runs[name])"""),
    ("md", """\
## 2. Model soups

Every run's final params are restored (`merging.restore_params`) and evaluated on the same 8 validation
batches per domain. The **uniform soup** is the mean of all four fine-tunes (`merge("linear", ...)`). The
**greedy soup** (Wortsman et al. 2022, recipe 1; `greedy_soup`) sorts the ingredients by held-out loss and
adds each to the soup only if the soup's held-out loss (here: the mean over the two domains) does not go
up, so it is never worse than its best ingredient on the data that chose it. (The paper chooses on
held-out validation data and reports on a test set; here both are the same batches.)

Look for: averaging works at all (fine-tunes of one base stay in one loss basin, so their mean is a good
model, not noise), which ingredients the greedy soup keeps or drops, and that only the greedy soup carries a
guarantee: a uniform soup of poor ingredients can fall below the best one."""),
    ("code", """\
config = make()
mesh, cfg = parts.make_mesh(config), parts.model_config(config)
evals = parts.eval_sets(config)  # {domain: 8 validation batches of 8 x 64 bytes}
program = build_program(cfg, config.train, mesh)
params = {name: merging.restore_params(wd, mesh, config.train)[0] for name, wd in runs.items()}


def losses(p, program=program):
  out = {d: m["loss"] for d, m in probes.domain_losses(program, p, evals).items()}
  return dict(out, mean=float(np.mean([out[d] for d in DOMAINS])))


def show(rows):
  print(f"{'model':<16}" + "".join(f"{k:>19}" for k in (*DOMAINS, "mean")))
  for name, row in rows.items():
    print(f"{name:<16}" + "".join(f"{row[k]:>19.4f}" for k in (*DOMAINS, "mean")))


names = list(FINETUNES)
ingredients = [params[n] for n in names]
soup, trace = greedy_soup(ingredients, lambda p: losses(p)["mean"])
rows = {n: losses(params[n]) for n in names}
rows["uniform-soup"] = losses(merge("linear", ingredients))
rows["greedy-soup"] = losses(soup)
show(rows)
print("\\ngreedy trace (by own loss; kept when the soup's mean loss does not go up):")
for t in trace:
  print(f"  + {names[t['ingredient']]:<9} own {t['loss']:.4f}  soup {t['soup_loss']:.4f}  "
        f"{'kept' if t['added'] else 'dropped'}")""", ["soup"]),
    ("md", """\
## 3. Task vectors: task arithmetic, TIES, DARE

A fine-tune's task vector is what it added to the base: tau = theta_ft - theta_base. The English and the
Python specialist are merged three ways (`merge(method, [english, python], base, ...)`), with their plain
average for reference:

* **task arithmetic**: theta_base + tau_en + tau_py (both edits at full strength);
* **TIES**: trim each tau to its largest 50% magnitudes (`density=0.5`), elect each parameter's sign
  from the sum, and average only the entries that agree with it (resolving interference);
* **DARE-TIES**: drop 50% of each tau's entries at random and rescale the rest by 2, then TIES' election;
* **average**: the uniform soup of the two, i.e. task arithmetic at half strength.

Look for: how close each merge gets to each specialist on its own domain, the cost of adding both task
vectors at full strength (task arithmetic) and how much of it TIES' trim and sign election recover."""),
    ("code", """\
base, english, python = params["base"], params["english"], params["python"]
merges = {
    "task-arithmetic": merge("task_arithmetic", [english, python], base),
    "ties": merge("ties", [english, python], base, density=0.5),
    "dare-ties": merge("dare_ties", [english, python], base, density=0.5, key=jax.random.key(0)),
    "average": merge("linear", [english, python]),
}
tied = {n: losses(p) for n, p in merges.items()}
show({"base": losses(base), "english": rows["english"], "python": rows["python"], **tied})""", ["ties"]),
    ("md", """\
The same TIES merge as a run: a config with a `merge` section (`python -m moegrow.merge --config=...`
does this) restores the sources, merges, prints each source's and the result's loss, and writes an
ordinary checkpoint at step 0 of a new workdir with a fresh optimizer state, lineage naming the sources,
and the certificate `merge.json`. `python -m moegrow.main` with the same config and workdir trains it on."""),
    ("code", """\
mc = make()
mc.merge = dict(sources=[runs["english"], runs["python"]], base=runs["base"], method="ties",
                params=dict(density=0.5), overrides=[], seed=0)
cert = merging.merge_run(mc, os.path.join(root, "ties"))
print("workdir:", sorted(os.listdir(os.path.join(root, "ties"))))
print("certificate:", {k: cert[k] for k in ("merge", "params", "base")}, "| sources:", len(cert["sources"]))
same = all(abs(cert["loss_result"][d] - tied["ties"][d]) < 1e-5 for d in DOMAINS)
print("merge_run result == in-memory ties:", same)""", ["merge-run"]),
    ("md", """\
## 4. Branch-Train-MiX: two branches, one MoE

The English and Python specialists are two branches of one seed (the base). `btx.mix` makes every layer's
MLP an MoE with branch e's MLP as expert e (expert 0 = English, expert 1 = Python) and averages everything
else (attention, embeddings, norms); here each token goes to its top-1 expert. The router starts

* **random**: N(0, 0.02) columns, as in BTX before its MoE fine-tune;
* **hidden-state** (mergekit-moe's `hidden` gate mode): each domain's mean MLP input per layer
  (`probes.mlp_input_means`), measured on the branches' average, i.e. the model the routers sit in (exact
  for layer 0, whose inputs come from averaged weights only), becomes router column
  `centroid_e - mean of the others` (`btx.router_from_centroids`).

BTX then trains the MoE on all data (the "MiX" stage); the numbers below are the mixed model at step 0,
before that training, so it need not beat the plain average yet. The routing table is the fraction of each
domain's validation tokens sent to each expert per MoE layer (`probes.routing_report`: `router_choices` +
`expert_load`). Look for: with hidden-state routers more of each domain's tokens reach its own branch's
expert than with random ones, and the mixed model's loss follows."""),
    ("code", """\
branches = [english, python]
centroids = probes.mlp_input_means(cfg, merges["average"], evals, mesh)  # {layer: {domain: mean [D]}}
routers = {i: btx.router_from_centroids(np.stack([c[d] for d in DOMAINS])) for i, c in centroids.items()}
mixed = {kind: btx.mix(branches, cfg, jax.random.key(0), shapes=tf.abstract_params, top_k=1, routers=given)[:2]
         for kind, given in (("hidden", routers), ("random", None))}
moe_program = build_program(mixed["hidden"][1], config.train, mesh)
show({"english": rows["english"], "python": rows["python"], "average": tied["average"],
      **{f"btx-{kind}": losses(p, moe_program) for kind, (p, _) in mixed.items()}})

routing = {kind: probes.routing_report(c, p, evals, mesh, first_new={}) for kind, (p, c) in mixed.items()}
print(f"\\n{'router':<8} {'domain':<18} {'layer':>5} {'expert0':>8} {'expert1':>8}")
for kind, report in routing.items():
  for d in DOMAINS:
    for i, m in report[d].items():
      print(f"{kind:<8} {d:<18} {i:>5} " + " ".join(f"{x:>8.3f}" for x in m["load"]))
print("\\ndomain alignment (mean over domains of the fraction routed to the domain's own expert; 0.5: none)")
for kind, report in routing.items():
  align = {i: np.mean([report[d][i]["load"][e] for e, d in enumerate(DOMAINS)]) for i in report[ENGLISH]}
  print(f"  {kind:<7}", "  ".join(f"layer {i}: {a:.3f}" for i, a in align.items()))""", ["btx"]),
    ("code", """\
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(8, 2.6), sharey=True)
for ax, (kind, report) in zip(axes, routing.items()):
  grid = np.array([report[d][i]["load"] for d in DOMAINS for i in report[d]])
  im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
  for (r, e), x in np.ndenumerate(grid):
    ax.text(e, r, f"{x:.2f}", ha="center", va="center", color="w" if x < 0.6 else "k")
  ax.set_xticks([0, 1], ["expert 0\\n(English)", "expert 1\\n(Python)"])
  ax.set_title(f"{kind} router")
axes[0].set_yticks(range(len(grid)), [f"{d} / layer {i}" for d in DOMAINS for i in routing["hidden"][d]])
fig.colorbar(im, ax=axes, label="fraction of tokens")
fig.savefig(os.path.join(root, "btx_routing.png"), dpi=100, bbox_inches="tight")
plt.close(fig)
display(Image(os.path.join(root, "btx_routing.png")))"""),
    ("md", """\
At this scale (d_model 64, about a hundred steps) many byte tokens (spaces, newlines, brackets) are
common to both domains and the centroids are close, so routing is far from clean. The same cells run on the
`small` config or on real checkpoints with the runs, steps and mixtures changed."""),
]

if __name__ == "__main__":
  sys.exit(nbmake.main(["03", *sys.argv[1:]]))
