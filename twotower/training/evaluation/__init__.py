"""Held-out quality: which rows are held out, recall@k and MRR of a tower beside the
parameter-free baselines, a run's evaluations, best-checkpoint selection and patience, how often
to evaluate, and `twotower eval`. Usable without the loop (serve/ encodes a run's held-out rows)."""
