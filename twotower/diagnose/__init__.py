"""Explaining a machine or a run: `twotower doctor` (environment, OpenMP census, data
checks) and `twotower replay` (every engine on one logged step)."""
