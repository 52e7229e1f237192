"""What the checkpoint checksums cost (moegrow/integrity.py): save and restore of a real train state
with them (moegrow.checkpoint) against the same Orbax calls without them.

  python -m benchmarks.integrity [--quick] [--out benchmarks/results/integrity.json]

Setup: the state a trainer saves (params + Adam moments + step, float32) of a dense byte-level LM
(default d=512, 8 layers, d_ff=2048: 386 MiB of state; --quick: d=128, 2 layers).
  save     checkpoint.save (one checksum pass under jit, then the async Orbax save) + wait;
  restore  checkpoint.restore (metadata and shape checks, Orbax restore, the checksum pass and the
           comparison);
each timed as it is ("with") and with the checksum pass replaced by nothing in this process
("without": the same code otherwise, what 0.5 did);
  survey   the checksum pass alone (integrity.survey), after one warm-up call that compiles it.
Each timing is the median of --repeats runs, alternating the two variants, in one process on one
machine: the ratios are the result. Target: with / without <= 1.10 for save and for restore.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

SIZES = {"full": dict(d_model=512, num_layers=8, num_heads=8, d_ff=2048),
         "quick": dict(d_model=128, num_layers=2, num_heads=2, d_ff=512)}
TARGET = 1.10


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  import jax

  from moegrow import checkpoint, integrity
  from moegrow.config import ModelConfig
  from moegrow.sharding import make_mesh
  from moegrow.train import steps
  from moegrow.configs import lm

  cfg = ModelConfig(vocab_size=259, **SIZES["quick" if args.quick else "full"])
  prog = steps.build_program(cfg, lm.get_config("tiny").train, make_mesh({"data": 1}, devices=jax.devices()[:1]))
  state = prog.init(jax.random.key(0))
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
  meta = {"model": cfg.to_dict(), "stage": 0, "lineage": []}
  root = tempfile.mkdtemp(prefix="integrity-bench-")
  integrity.survey(state)  # compile the checksum pass once

  real_survey, real_verify = integrity.survey, checkpoint.verify

  def checksums(on: bool) -> None:
    integrity.survey = real_survey if on else (lambda tree, prefix="": ({}, []))
    checkpoint.verify = real_verify if on else (lambda *a, **k: None)

  def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0

  times = {k: [] for k in ("save_with", "save_without", "restore_with", "restore_without", "survey")}
  try:
    for r in range(args.repeats):
      with_dir, without_dir = os.path.join(root, f"with{r}"), os.path.join(root, f"without{r}")
      m_with, m_without = checkpoint.manager(with_dir), checkpoint.manager(without_dir)
      for on, mngr, tag in ((True, m_with, "with"), (False, m_without, "without")):
        checksums(on)
        times["save_" + tag].append(timed(lambda: (checkpoint.save(mngr, 1, state, meta), mngr.wait_until_finished())))
        times["restore_" + tag].append(timed(lambda: jax.block_until_ready(
            checkpoint.restore(mngr, 1, prog.abstract_state)[0])))
      checksums(True)
      times["survey"].append(timed(lambda: integrity.survey(state)))
      m_with.close()
      m_without.close()
      shutil.rmtree(with_dir)
      shutil.rmtree(without_dir)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  result = {"size": "quick" if args.quick else "full", "state_mib": nbytes / 2**20, "repeats": args.repeats,
            "device": jax.devices()[0].device_kind, "median_s": med,
            "save_ratio": med["save_with"] / med["save_without"],
            "restore_ratio": med["restore_with"] / med["restore_without"],
            "survey_gib_per_s": nbytes / 2**30 / med["survey"], "target": TARGET}
  print(f"state {result['state_mib']:.1f} MiB on {result['device']}, median of {args.repeats}")
  for k in ("save", "restore"):
    print(f"  {k:8s} with checksums {med[k + '_with']:.3f} s, without {med[k + '_without']:.3f} s: "
          f"ratio {result[k + '_ratio']:.3f} (target <= {TARGET})")
  print(f"  checksum pass alone {med['survey']:.3f} s ({result['survey_gib_per_s']:.2f} GiB/s)")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
