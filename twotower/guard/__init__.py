"""Keeping a run alive: the supervisor, the child monitor and its watchdog, crash evidence
and forensics, and `twotower watch` for any command."""
