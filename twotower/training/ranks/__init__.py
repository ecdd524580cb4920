"""The processes a run trains in: torchrun ranks (process group, batch shards, all-gathers) and
one process behind the same interface."""
