"""The process's own plumbing, shared by every part: its memory readings (`memory`), OpenMP
runtimes and thread pools (`openmp`, `threads`), how a process ended (`exit_status`), crash
dumps (`crash_dump`), the collective ledger of a torchrun rank (`collective_ledger`) and the
fault-injection switch (`faults`)."""
