"""The run directory's formats and their one owner: where each file lives (`rundir`), the run's
settings with what a missing key meant (`settings`), the heartbeat (`heartbeat`), the
metrics log (`rundir.MetricsLog`). Every command reads a run through this part."""
