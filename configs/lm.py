"""Train a byte-level LM on the Shakespeare + Python-stdlib mixture (dense or MoE).

Variants (`--config=configs/lm.py:<variant>`):
  tiny   tests and smoke runs: d=64, 2 layers, 200 steps of 8 x 64 bytes (~10 s on 2 CPU cores).
  small  the CPU demo: d=256, 4 layers, d_ff=1024, 600 steps of 16 x 256 bytes (~6 minutes on
         2 CPU cores at ~7k tokens/s).
  pod    a TPU-pod size: 0.97B total / 0.37B active parameters, d=1024, 16 layers, 16 heads,
         E=8 top-2 experts (d_ff 4096) in every other layer, bfloat16, sequence 2048, batch 512,
         on c4/en. Mesh (data=-1, fsdp=8, expert=8): parameters fully sharded 8 ways, experts
         split 8 ways (one per chip of an expert group: dropless expert parallelism), batch over
         all chips; needs a multiple of 64 chips. Per-block remat, splash attention (TPU), the
         blocks scanned (8 x a dense + MoE pair). Compiled ahead of time
         (python -m moegrow.aot --config=configs/lm.py:pod --topology=<slice>), per chip:
           v5e-64   10.73 / 16 GiB (33% headroom), train step compiles in 102 s
           v4-128   22.38 / 32 GiB (30% headroom), 61-74 s
           v5p-128  10.33 / 95 GiB (89% headroom), 85-102 s
         roofline estimate 0.29 / 0.21 / 0.12 s per step (benchmarks/README.md, "TPU slices").
         Launch with experiments/launch_tpu.sh.
Append `,moe` for E=8 top-2 MoE MLPs in every other layer (e.g. `small,moe`).

Command:
  python -m moegrow.main --config=configs/lm.py:small --workdir=runs/small
Expected (small, dense, 2 CPU cores): validation bits/byte 2.68 (shakespeare_plays) and 2.69
(python_stdlib) after 600 steps (loss 1.861 / 1.863 nats), at about 7.0-7.6k tokens/s.
"""
import ml_collections

from moegrow.config import ModelConfig


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
  parts = arg.split(",") if arg else ["small"]
  variant, moe = parts[0], "moe" in parts[1:]
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(ModelConfig.defaults())  # every field, at its default
  c.data = ml_collections.ConfigDict(dict(
      mixture=ml_collections.ConfigDict({"shakespeare_plays": 0.5, "python_stdlib": 0.5}),
      data_dir="", seq_len=256, text_key="text",
      tokenizer="bytes",  # or a HF tokenizer.json / a folder holding one (model.vocab_size >= its vocab)
      shards=0))  # data shards (0: one per process); the same shards on any process count = the same stream
  c.train = ml_collections.ConfigDict(dict(
      steps=600, batch_size=16, lr=3e-3, warmup_steps=50, schedule="cosine",  # or "constant", "rsqrt"
      min_lr_ratio=0.1,
      b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0, seed=0, frozen=(),
      microbatches=1,  # gradient accumulation: the batch in this many slices, one optimizer update
      log_every=20, eval_every=200, eval_batches=4, eval_batch_size=16,
      checkpoint_every=200, keep_checkpoints=2, async_checkpoint=True,
      # A corrupt newest checkpoint of this run on resume: "stop" (name it and how to go on) or
      # "previous" (move it to <workdir>/corrupt/ and resume from the newest intact one).
      on_corrupt_checkpoint="stop",
      stop_after_steps=0,  # >0: end this invocation (with a checkpoint) after that many steps
      stop_at_step=0))  # >0: end this invocation (with a checkpoint) at that global step
  # Mesh axes (-1: the rest); their product must be the devices used: all, or mesh.num_devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1, num_devices=0))
  # Multi-host start-up (moegrow.main): enabled with no address = jax.distributed.initialize() discovers
  # the cluster (TPU/GPU pods); with an address, e.g. two CPU processes on loopback:
  # --config.distributed.coordinator_address=127.0.0.1:1234 --config.distributed.num_processes=2
  # --config.distributed.process_id=0 (and =1 in the second process).
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=0, process_id=-1, local_device_ids=""))
  if variant == "tiny":
    c.model.update(d_model=64, num_layers=2, num_heads=2, d_ff=256)
    c.data.seq_len = 64
    c.train.update(steps=200, batch_size=8, warmup_steps=10, log_every=20, eval_every=100, eval_batches=2,
                   eval_batch_size=8, checkpoint_every=100, lr=1e-2)
  elif variant == "pod":
    c.model.update(d_model=1024, num_layers=16, num_heads=16, d_ff=4096, dtype="bfloat16",
                   remat="block", scan_layers=True)  # attention "auto": splash on TPU
    c.data.update(seq_len=2048)
    c.data.mixture = ml_collections.ConfigDict({"c4/en": 1.0})
    c.train.update(steps=100_000, batch_size=512, lr=3e-4, warmup_steps=2000, log_every=100,
                   eval_every=2000, eval_batches=8, eval_batch_size=64, checkpoint_every=2000)
    c.mesh.update(data=-1, fsdp=8, expert=8)
    c.distributed.enabled = True
    moe = True
  elif variant != "small":
    raise ValueError(f"configs/lm.py: unknown variant {variant!r}; use tiny, small or pod")
  if moe:
    c.model.update(moe_layers="every_other", num_experts=8, top_k=2)
  return c
