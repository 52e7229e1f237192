"""Generates notebooks/02_continual.ipynb, stored executed: outputs and plots included.

  python notebooks/nbmake.py             # rebuild and execute every notebook (see nbmake.py)
  python notebooks/make_02.py            # this one only: build from the cells below, execute, store
  python notebooks/make_02.py --check    # exit 1 if the stored cells differ from the cells below

Edit the cells here, not in the .ipynb. Cells tagged `frontier` and `frozen` are parsed by
tests/test_notebooks.py: keep their printed formats.
"""
import os
import sys

import nbmake

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "02_continual.ipynb")

CELLS = [
    ("md", """\
# 02 - Continual pre-training: a new domain, new experts, and what the model forgets

A small MoE learns English (Shakespeare); then Python arrives. We continue training two ways:

* **plain**: fine-tune on Python;
* **protected**: grow the expert table 2 -> 4, freeze the old experts and their router columns
  (Lifelong-MoE), add EWC (a Fisher-weighted pull towards the English model) and replay 5% English.

Both are ordinary `moegrow` runs: stage options in a config, run by `moegrow.orchestrate.stages`. At the end of
the Python stage each run writes a **forgetting report**: the English validation loss now minus before the
shift, the **routing drift** (the fraction of English tokens now routed to a new expert) and a heatmap of
the per-expert load per domain. About two minutes on 2 CPU cores.
The stored outputs show the runs' temporary directory as `<root>` and elide the training log's
wall-clock throughput and ETA (`…`), which differ every run."""),
    ("code", """\
import json
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
from moegrow.orchestrate import boundary, parts, stages

data_dir = os.environ.get("MOEGROW_DATA_DIR") or tempfile.mkdtemp(prefix="moegrow_data_")
root = tempfile.mkdtemp(prefix="moegrow_continual_")  # every run's workdir; <root> in the stored outputs
print("jax", jax.__version__, "on", jax.default_backend())"""),
    ("md", """\
## 1. Two runs that share stage 0

Stage 0 is the same in both configs (same seed, same data), so both runs start the Python stage from the
same English model. The protected run's stage 1 carries the options; everything else is identical."""),
    ("code", """\
ENGLISH, PYTHON = "shakespeare_plays", "python_stdlib"


def make(arm):
  c = lm.get_config("tiny")
  c.data.data_dir = data_dir
  c.mesh.update(data=1, num_devices=1)
  c.model.update(moe_layers="every_other", num_experts=2, top_k=1)
  c.train.update(steps=0, batch_size=16, warmup_steps=5, log_every=20, eval_every=1000, eval_batches=8,
                 checkpoint_every=1000)
  python = dict(name="python", steps=40, mixture={PYTHON: 1.0})
  if arm == "protected":
    python.update(ops=(dict(op="add_experts", num_experts=4, mode="copy_noise"),),
                  freeze_old_experts=True,
                  ewc=dict(weight=30.0, batches=4, batch_size=16),
                  replay=dict(fraction=0.05))
  c.stages = (dict(name="english", steps=60, mixture={ENGLISH: 1.0}), python)
  return c


results = {}
for arm in ("plain", "protected"):
  print(f"=== {arm}")
  results[arm] = stages.train_and_evaluate(make(arm), os.path.join(root, arm))"""),
    ("md", """\
## 2. The forgetting report

`result["forgetting"]` holds the scalars that also went to `metrics.jsonl`; `<workdir>/continual/stage1.json`
has the per-layer detail. Forgetting > 0 means the English loss went up during the Python stage."""),
    ("code", """\
print(f"{'arm':<10} {'python_loss':>12} {'forgetting':>11} {'drift':>7}")
for arm, r in results.items():
  drift = r["forgetting"].get(f"drift/{ENGLISH}", float("nan"))
  print(f"{arm:<10} {r[f'eval/{PYTHON}/loss']:>12.4f} {r['forgetting'][f'forgetting/{ENGLISH}']:>11.4f} "
        f"{drift:>7.3f}")""", ["frontier"]),
    ("code", """\
report = json.load(open(os.path.join(root, "protected", "continual", "stage1.json")))
for domain, layers in report["routing"].items():
  for layer, m in layers.items():
    print(f"{domain:<18} layer {layer}: load " + " ".join(f"{x:.3f}" for x in m["load"]) + f"  drift {m['drift']:.3f}")
display(Image(os.path.join(root, "protected", "continual", "stage1_loads.png")))"""),
    ("md", """\
## 3. What was frozen stayed frozen

The old experts (0 and 1) and their router columns of the protected run are bit-identical to the English
model's, after 40 steps of AdamW with weight decay 0.1 and momentum: moegrow masks the optimizer's final
updates, not the gradients. The English model is read back from its own checkpoint, the same one the
distillation teacher would come from (`boundary.teacher_params`)."""),
    ("code", """\
config = make("protected")
plan = parts.resolve_stages(config, parts.model_config(config))
english = jax.device_get(boundary.teacher_params(os.path.join(root, "protected"), plan, plan[1], config.train,
                                               parts.make_mesh(config)))
final = jax.device_get(results["protected"]["state"]["params"])
old, new = english["blocks"]["1"]["mlp"], final["blocks"]["1"]["mlp"]
same = all(np.array_equal(old[k], new[k][:2]) for k in ("wact_EDF", "wlin_EDF", "wo_EFD"))
same &= np.array_equal(old["router_DE"], new["router_DE"][:, :2])
print("old experts bit-identical:", bool(same))
rows = [json.loads(l) for l in open(os.path.join(root, "protected", "metrics.jsonl"))]
ewc = [(r["step"], r["ewc_penalty"]) for r in rows if "ewc_penalty" in r]
print("EWC penalty (step, value):", ", ".join(f"({s}, {v:.2e})" for s, v in ewc))""", ["frozen"]),
    ("md", """\
The full comparison, with replay fractions, three EWC strengths, distillation and joint training over
several seeds, is the figure in `experiments/continual/` (`python -m experiments.continual.run`)."""),
]

if __name__ == "__main__":
  sys.exit(nbmake.main(["02", *sys.argv[1:]]))
