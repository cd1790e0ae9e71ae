"""bp-merge: merge LoRA adapters into the full-precision base model, streaming from disk."""
