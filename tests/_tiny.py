"""Tiny configs shared by test files (import as `from _tiny import ...`).

`model(**kw)`: a 2-layer dense ModelConfig (d=16, 2 heads, d_ff=32) small enough for any unit
test; `moe(**kw)`: the same with layer 1 a 4-expert top-2 MoE with one shared expert;
`train_config(data_dir, **train_kw)`: the `tiny` training config of configs/lm.py on one device;
`read_metrics(workdir)`: the rows of a run's metrics.jsonl; `digest(folder)`: one hash of every
file name and byte under a folder (sources must stay byte-identical).
"""
from __future__ import annotations

import hashlib
import json
import os

from moegrow.config import ModelConfig

TINY = dict(vocab_size=259, d_model=16, num_layers=2, num_heads=2, d_ff=32)
TINY_MOE = dict(moe_layers=(1,), num_experts=4, top_k=2, expert_d_ff=24, num_shared_experts=1, shared_d_ff=8)


def model(**kw) -> ModelConfig:
  return ModelConfig(**{**TINY, **kw})


def moe(**kw) -> ModelConfig:
  return ModelConfig(**{**TINY, **TINY_MOE, **kw})


def train_config(data_dir: str, **train_kw):
  from moegrow.configs import lm
  c = lm.get_config("tiny")
  c.data.data_dir = data_dir
  c.mesh.update(data=1, num_devices=1)  # one device, whatever the test session simulates
  c.train.update(**train_kw)
  return c


def read_metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def digest(folder) -> str:
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(folder)):
    for f in sorted(files):
      h.update(f.encode())
      with open(os.path.join(root, f), "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def csv_rows(path) -> list[dict]:
  import csv
  with open(path) as f:
    return list(csv.DictReader(f))


def num(v) -> float:
  """A CSV cell as a float ('' and 'nan' are nan)."""
  return float("nan") if v in ("", "nan") else float(v)


FIGURE_SIZE = (200, 400)  # a figure's PNG is at least this many pixels (height, width)


def check_png(path, min_size=(0, 0)) -> None:
  """A real, non-blank PNG of at least `min_size` pixels (height, width)."""
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG"
  import matplotlib.image
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and img.shape[0] >= min_size[0] and img.shape[1] >= min_size[1], \
      f"{path}: image of shape {img.shape}"
  assert img[..., :3].std() > 0.01, f"{path} is blank"
