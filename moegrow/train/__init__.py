"""Training machinery: compiled steps (`steps`), the optimizer (`optim`), loss terms against
forgetting (`continual`), the stage loop (`loop`), measurements (`probes`), the forgetting report
(`forgetting`) and run output (`logbook`, `plot`). The orchestrators that drive it are in
`moegrow.orchestrate`."""
