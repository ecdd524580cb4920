"""A return code in words (`twotower/process/exit_status.py`): the supervisor's report, a miner
worker's crash and the OpenMP census all read it from here."""

from __future__ import annotations

from twotower.process.exit_status import ExitStatus, signal_name


def test_exit_statuses_decode_to_signal_names() -> None:
    assert ExitStatus(-11).signal == "SIGSEGV" and ExitStatus(-11).shell_code() == 139
    assert ExitStatus(-9).describe().startswith("killed by SIGKILL")
    assert ExitStatus(3).signal is None and ExitStatus(3).describe() == "exited with code 3"


def test_the_short_form_leaves_out_the_meaning_and_unknown_signals_get_a_number() -> None:
    assert ExitStatus(-11).describe(meaning=False) == "killed by SIGSEGV"
    assert ExitStatus(-11).describe() == ExitStatus(-11).describe(meaning=False) + (
        " (segmentation fault: native code touched memory it does not own)"
    )
    assert signal_name(11) == "SIGSEGV" and signal_name(999) == "signal 999"
    assert ExitStatus(-999).describe() == "killed by signal 999"
