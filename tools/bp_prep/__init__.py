"""bp-prep: clean, validate and render datasets for training (see bp_common.dataprep)."""
