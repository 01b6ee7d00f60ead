"""Experiments: one file per paper result; each has `get_config(arg)` and writes results into its workdir."""
