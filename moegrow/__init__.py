"""moegrow: grow sparse Mixture-of-Experts language models in JAX.

Packages: `model` (the transformer and its MoE layers), `surgery` (growth ops and merging on plain
dicts), `data` (corpora, tokenizers, the resumable pipeline), `train` (compiled steps, the stage
loop, the orchestrators), `hf` (Hugging Face import and export).
Modules: `config` (ModelConfig), `sharding` (logical axes and meshes), `trees` (plain-dict helpers),
`flops` (the one FLOPs formula), `checkpoint` (Orbax checkpoints and their metadata), `lora` and
`ramp` (adapter and ramp-mask arithmetic on plain dicts), `distributed` (multi-process start-up),
`workdir_lock` (one run per workdir), `cli` (user errors as one message), `aot` (ahead-of-time
TPU compiles), `hlo` (the collectives in compiled HLO), and the commands `main`, `grow`, `merge`.
Imports go one way (docs/architecture.md): commands -> train -> {surgery, checkpoint, data} ->
model -> {config, sharding, trees}.
"""

__version__ = "0.5.0"
