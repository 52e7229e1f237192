"""The plain-dict layer: parameter trees as nested dicts with string keys (`trees`), LoRA adapter
arithmetic (`lora`) and ramp masks (`ramp`) on them. Pure functions, no model code; the model,
surgery, training and checkpoints all build on it."""
