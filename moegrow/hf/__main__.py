"""Hugging Face import and export.

  python -m moegrow.hf import --from=<HF model dir> --workdir=<new run> [--config=<run config>]
  python -m moegrow.main --config=configs/hf.py:<run> --workdir=<run>      # train / grow it
  python -m moegrow.hf export --from=<workdir | checkpoints dir | step dir> --to=<new dir>
      [--arch=MixtralForCausalLM] [--dtype=bfloat16]

`--config` (import) gives the mesh and optimizer of the run (default configs/lm.py's); its model
section is replaced by the imported one. See moegrow/hf/convert.py.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from moegrow.cli import run_command
from moegrow.configs import lm
from moegrow.hf import convert

FLAGS = flags.FLAGS
flags.DEFINE_string("from", None, "import: an HF model directory; export: a moegrow checkpoint.")
flags.DEFINE_string("workdir", None, "import: the new run directory.")
flags.DEFINE_string("to", None, "export: the new HF model directory.")
flags.DEFINE_string("arch", None, "export: the HF class (default: the one that holds the model exactly).")
flags.DEFINE_string("dtype", None, "export: float32, bfloat16 or float16 (default: the model's dtype).")
flags.DEFINE_integer("max_shard_mb", 5 * 1024, "export: the largest safetensors shard, MiB.")
config_flags.DEFINE_config_file("config", None, "import: run config for the mesh and optimizer (optional).")
flags.mark_flag_as_required("from")


def main(argv):
  if len(argv) != 2 or argv[1] not in ("import", "export"):
    raise app.UsageError("usage: python -m moegrow.hf import|export --from=... (--workdir=... | --to=...)")
  logging.set_verbosity(logging.WARNING)
  run_command(lambda: _import() if argv[1] == "import" else _export())


def _import():
  if not FLAGS.workdir:
    raise ValueError("import needs --workdir=<new run directory>")
  cert = convert.import_model(FLAGS["from"].value, FLAGS.workdir, FLAGS.config or lm.get_config("small"))
  print(f"imported {cert['architecture']} ({cert['dtype']}) from {cert['hf_import']} into {FLAGS.workdir}")
  print(convert.certificate_text(cert))
  print(f"train it: python -m moegrow.main --config=configs/hf.py:{FLAGS.workdir} --workdir={FLAGS.workdir}",
        flush=True)


def _export():
  if not FLAGS.to:
    raise ValueError("export needs --to=<new HF model directory>")
  cert = convert.export_model(FLAGS["from"].value, FLAGS.to, lm.get_config("small"), FLAGS.arch, FLAGS.dtype,
                              max_shard_bytes=FLAGS.max_shard_mb * 2**20)
  print(f"exported {cert['source']} as {cert['architecture']} ({cert['dtype']}) to {FLAGS.to}")
  print(convert.certificate_text(cert), flush=True)


if __name__ == "__main__":
  app.run(main)
