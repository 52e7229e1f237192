"""Training: compiled steps (`steps`), the optimizer (`optim`), the stage loop (`loop`),
measurements (`probes`), run output (`logbook`, `plot`) and the orchestrator of stages and
growth boundaries (`stages`)."""
