"""A step's negatives beyond the batch: the memory-bank queue, hard-negative tables and their
refreshes (taken, searched beside training, used, pruned), the miners' set-up, and candidates
from the whole frozen bank (full softmax, sampled rows, logQ) with the choice between them."""
