"""The model: layers, the MoE MLP, the dropless grouped FFN and the decoder-only transformer.
Depends only on `moegrow.config`, `moegrow.sharding` and `moegrow.trees`."""
