"""The model: `layers` (RMSNorm, rotary attention and its kernels, dense MLP), `moe` (the MoE MLP:
router, gating, dispatch), `expert_parallel` (dropless dispatch with experts split over chips),
`grouped_ffn` (the fused dropless expert FFN for CPU) and `transformer` (the decoder-only LM and
its pure-dict interface). Depends only on `moegrow.config`, `moegrow.sharding`, `moegrow.params.trees`,
`moegrow.params.lora` and `moegrow.params.ramp`."""
