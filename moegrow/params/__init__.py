"""The plain-dict layer: parameter trees as nested dicts with string keys (`trees`), LoRA adapter
arithmetic (`lora`), ramp masks (`ramp`) and loss-free balancing's selection biases (`balance`) on them. Pure functions, no model code; the model,
surgery, training and checkpoints all build on it."""
