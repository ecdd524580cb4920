"""The loop and its state: step plan, batch assembly, queue, mining tables, evaluation,
checkpoints, the run directory and the heartbeat the loop writes."""
