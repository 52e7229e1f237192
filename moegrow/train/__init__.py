"""Training. The machinery: compiled steps (`steps`), the optimizer (`optim`), loss terms against
forgetting (`continual`), the stage loop (`loop`), measurements (`probes`), the forgetting report
(`forgetting`), run output (`logbook`, `plot`) and the config check (`validate`). The
orchestrators: a config's stages (`plan`), growth at a boundary (`boundary`), the run of stages
(`stages`), merging finished runs (`merging`) and Branch-Train-MiX (`branching`)."""
