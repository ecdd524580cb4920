"""doctor's platform checks: the macOS paths run here with a Mac's inputs, and each says
"not applicable here" off macOS; memory pressure and the thread budget from given readings."""

from __future__ import annotations

import pytest

from twotower.diagnose.doctor import check_platform
from twotower.diagnose.doctor_platform import (
    MPS_FALLBACK,
    Platform,
    check_memory_pressure,
    check_threads,
    this_platform,
)

MAC = Platform("Darwin", "arm64", translated=False, mps_built=True, mps_available=True)
VERSIONS = {"torch": "2.5.1", "numpy": "2.1.0"}
GB = 10**9


def statuses(where: Platform, environ: dict[str, str], versions: dict[str, str]) -> dict:
    return {f.check: (f.status, f.evidence) for f in check_platform(where, environ, versions)}


def test_a_healthy_apple_silicon_mac_passes_every_mac_check() -> None:
    found = statuses(MAC, {MPS_FALLBACK: "1"}, VERSIONS)
    assert {status for status, _ in found.values()} == {"ok"}
    assert set(found) == {"mps", "rosetta", MPS_FALLBACK, "torch-macos"}
    assert not any("not applicable" in evidence for _, evidence in found.values())


def test_every_mac_check_is_not_applicable_on_linux() -> None:
    linux = Platform("Linux", "x86_64", mps_built=False, mps_available=False)
    found = statuses(linux, {MPS_FALLBACK: "yes"}, VERSIONS)
    for check, (status, evidence) in found.items():
        assert status == "ok" and evidence.startswith("not applicable here"), check


@pytest.mark.parametrize(
    ("where", "environ", "versions", "check", "status"),
    [
        (Platform("Darwin", "x86_64", translated=True, mps_built=True, mps_available=False),
         {}, VERSIONS, "rosetta", "fail"),
        (Platform("Darwin", "arm64", mps_built=False, mps_available=False),
         {}, VERSIONS, "mps", "warn"),
        (Platform("Darwin", "arm64", mps_built=True, mps_available=False),
         {}, VERSIONS, "mps", "warn"),
        (MAC, {MPS_FALLBACK: "true"}, VERSIONS, MPS_FALLBACK, "warn"),
        (Platform("Darwin", "x86_64", mps_built=False, mps_available=False),
         {}, {"torch": "2.2.2", "numpy": "2.0.1"}, "torch-macos", "fail"),
        (Platform("Darwin", "x86_64", mps_built=False, mps_available=False),
         {}, {"torch": "2.2.2", "numpy": "1.26.4"}, "torch-macos", "ok"),
        (Platform("Darwin", "arm64"), {}, {"numpy": "2.1.0"}, "mps", "warn"),  # no torch
    ],
)  # fmt: skip
def test_what_goes_wrong_on_a_mac_is_named(
    where: Platform, environ: dict[str, str], versions: dict[str, str], check: str, status: str
) -> None:
    assert statuses(where, environ, versions)[check][0] == status


def test_this_machine_is_described_as_it_is() -> None:
    here = this_platform()
    torch = pytest.importorskip("torch")
    assert here.mps_built == torch.backends.mps.is_built()
    assert here.mps_available == torch.backends.mps.is_available()


def test_memory_pressure_warns_only_when_little_is_left() -> None:
    roomy = {"total": 24 * GB, "available": 20 * GB, "swap_total": 0, "swap_used": 0}
    tight = {"total": 24 * GB, "available": 1 * GB, "swap_total": 8 * GB, "swap_used": 6 * GB}
    assert check_memory_pressure(roomy).status == "ok"
    warned = check_memory_pressure(tight)
    assert warned.status == "warn" and "6.00 of 8.00 GB" in warned.evidence
    assert "jetsam" in warned.action


def test_the_thread_finding_shows_each_case_of_the_rule() -> None:
    finding = check_threads(4)
    shares = [(b["trainer"], b["beside_search"], b["miner"]) for b in finding.details.values()]
    expected = [(4, None, None), (4, None, 4), (4, 2, 2)]  # overlapped: 2 + 2 during a search
    assert sorted(shares, key=str) == sorted(expected, key=str)
    assert "4 usable cores" in finding.evidence
    assert "trainer 4 (2 while the worker searches) + miner worker 2 threads" in finding.evidence
