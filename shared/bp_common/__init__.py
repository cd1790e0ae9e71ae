"""bp_common: the small library every bp-* tool shares.

Importing it is cheap: no torch, no transformers. Modules: errors (codes, catalog, exit
codes), manifest, cli (common flags, main() wrapper), progress, device, io (atomic writes,
locks, hashing), models (resolve and load safely), presets, envvars, redact, tinymodel.
"""
__version__ = "0.1.0"
