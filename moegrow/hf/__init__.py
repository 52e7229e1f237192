"""Hugging Face interop: import pretrained checkpoints into moegrow runs and export moegrow models
as checkpoints `transformers` loads with no custom code.

  arch      config.json <-> ModelConfig for each supported architecture (refuses what moegrow or
            the target class cannot represent exactly, naming the field)
  weights   tensor names and layouts: HF state dict <-> moegrow params (pure functions)
  files     sharded safetensors: read tensor by tensor, write atomically with the index
  convert   the two commands and their certificates
  __main__  the command line, `python -m moegrow.hf import|export`
"""
