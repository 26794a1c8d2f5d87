"""Hugging Face interop: config.json <-> ModelConfig, foldmoe <-> HF tensor names, and
slice-wise reading of safetensors checkpoints straight into a rank's shards."""
