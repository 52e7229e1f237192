"""Checkpoint surgery: pure functions on plain dicts (params and Adam moments) and configs.

`rules` (the declarative engine), `op` (what an op is), `moe_ops` and `shape_ops` (the growth
ops), `apply` (run ops on a state). Imports nothing from the model, sharding, checkpoints or
training: shapes of a target tree come in as an argument.
"""
