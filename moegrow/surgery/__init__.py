"""Checkpoint surgery: pure functions on plain dicts (params and Adam moments) and configs.

`rules` (the declarative engine), `op` (what an op is), `moe_ops`, `shape_ops`, `shrink_ops`,
`lora_ops` and `rebake` (the growth ops; `shrink_ops` prunes or merges experts,
`rebake.to_dense` turns MoE layers dense), `apply` (run ops on a state),
`merge` (weight merging of several models) and `btx` (Branch-Train-MiX's mix). Imports nothing
from the model, sharding, checkpoints or training: shapes of a target tree come in as an argument.
"""
