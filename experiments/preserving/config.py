"""One arm of the function-preserving growth figure as an ordinary moegrow config.

  python -m moegrow.main --config=experiments/preserving/config.py:small,wide_ramped --workdir=runs/p
(a grown arm given alone trains its own stage 0, identical to small's for the same seed;
`python -m experiments.preserving.run --seeds 0,1,2` runs every arm and seed, sharing stage 0, and
writes the spike table.) Arms: small, wide_exact, wide_random, wide_ramped, deep_exact,
deep_random, deep_ramped, wide_scratch, deep_scratch; sizes: small (the figure), quick (tests).
Expected: the certificate's loss change at the growth step (step 150) is 0 (|Δ| < 1e-5) for
*_exact, *_ramped and small, and positive for *_random (seed 0, measured: wide_random +0.55,
deep_random +0.02 nats on the certificate's rows). The paper's claim (MSG, Yao et al. 2024; Net2Net,
Chen et al. 2016) is that the non-preserving arms spike, take longer to recover, and end no lower
than exact/ramped. The 3-seed numbers are pending (the full run has not been made yet); see
experiments/preserving/README.md.
"""
from experiments.preserving import figure


def get_config(arg: str = "small,wide_exact"):
  parts = (arg or "small,wide_exact").split(",")
  cfgs = figure.configs(parts[0]) if len(parts) == 2 and parts[0] in figure.SIZES else {}
  if len(parts) != 2 or parts[1] not in cfgs:
    raise ValueError(f"experiments/preserving/config.py: expected '<size>,<arm>' with size in {sorted(figure.SIZES)} "
                     f"and arm in {sorted(cfgs) or sorted(('small',) + figure.GROWN + figure.SCRATCH)}, got {arg!r}")
  return cfgs[parts[1]]
