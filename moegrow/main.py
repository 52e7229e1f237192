"""moegrow entry point.

  python -m moegrow.main --config=configs/lm.py:small --workdir=runs/small [--config.train.steps=100]
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config(arg)).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, figures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  import jax  # after flag parsing: XLA flags may come from the environment
  config = _CONFIG.value
  if config.get("distributed", False):
    jax.distributed.initialize()
  from moegrow import train
  result = train.train_and_evaluate(config, _WORKDIR.value)
  if result.get("preempted"):
    print("preempted: checkpoint saved, run the same command to resume", flush=True)
  elif jax.process_index() == 0:
    from moegrow import plot
    print(f"loss curves: {plot.plot_run(_WORKDIR.value)}", flush=True)


if __name__ == "__main__":
  app.run(main)
