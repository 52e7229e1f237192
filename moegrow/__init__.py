"""moegrow: grow sparse Mixture-of-Experts language models in JAX.

Packages: `model` (the transformer and its MoE layers), `params` (the plain-dict layer: trees, LoRA
adapters, ramp masks), `surgery` (growth ops and merging on plain dicts), `data` (corpora,
tokenizers, the resumable pipeline), `train` (compiled steps, the optimizer, the stage loop,
probes), `orchestrate` (a run's stages, growth at boundaries, merging, Branch-Train-MiX, the config
check), `hf` (Hugging Face import and export).
Modules: `config` (ModelConfig), `sharding` (logical axes and meshes), `flops` (the one FLOPs
formula), `checkpoint` (Orbax checkpoints and their metadata), `integrity` (array checksums),
`distributed` (multi-process start-up), `workdir_lock` (one run per workdir), `cli` (user errors as
one message), `aot` (ahead-of-time TPU compiles), `hlo` (the collectives in compiled HLO), and the
commands `main` (train), `grow` (grow offline), `merge` (merge finished runs), `btx`
(Branch-Train-MiX).
Imports go one way (docs/architecture.md): commands -> orchestrate -> train -> {surgery,
checkpoint, data} -> model -> {config, sharding, params}.
"""

__version__ = "0.6.0"
