"""moegrow: grow sparse Mixture-of-Experts language models in JAX.

Packages, in the direction imports go (docs/architecture.md):
  main, grow (CLIs) -> train.stages -> {train.loop -> train.steps, train.probes, surgery,
  checkpoint, data} -> model -> {config, sharding, trees}.
"""
__version__ = "0.4.0"
