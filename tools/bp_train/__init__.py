"""bp-train: supervised fine-tuning (LoRA, QLoRA, DoRA), resumable checkpoints and run history."""
