"""bp-vram: memory plan before a single byte is loaded."""
