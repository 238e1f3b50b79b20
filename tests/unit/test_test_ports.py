"""The tests' own port picker (tests/conftest.free_port): launchers and spawned ranks get ports that
nothing else on the machine is handed, so two test runs side by side cannot take each other's."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import free_port, port_band


def _ephemeral_range() -> tuple[int, int]:
    path = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if not path.exists():
        pytest.skip("no Linux ephemeral port range to compare with")
    lo, hi = path.read_text().split()
    return int(lo), int(hi)


def test_the_band_is_outside_the_kernels_ephemeral_range_and_the_launch_default():
    lo, hi = port_band()
    eph_lo, eph_hi = _ephemeral_range()
    assert hi < eph_lo or lo > eph_hi, ((lo, hi), (eph_lo, eph_hi))
    assert not lo <= 29500 <= hi  # `pretrain launch`'s default master port (the Slurm test's job binds it)


def test_ports_are_in_the_band_distinct_and_not_bound(monkeypatch):
    monkeypatch.setenv("TANDEM_TEST_PORTS", "23000-23009")
    # Hold the port free_port would try next: it must be skipped, not handed out.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        for port in range(23000, 23010):
            try:
                held.bind(("", port))
                break
            except OSError:
                continue
        held.listen()
        taken = held.getsockname()[1]
        got = [free_port() for _ in range(5)]
    assert len(set(got)) == 5 and all(23000 <= p <= 23009 for p in got), got
    assert taken not in got


@pytest.mark.parametrize("text", ["", "23000", "2-1", "70000-70010", "a-b", "30000-20000"])
def test_a_malformed_band_is_refused_naming_the_variable(monkeypatch, text):
    monkeypatch.setenv("TANDEM_TEST_PORTS", text)
    if not text:
        assert port_band() == (21000, 28999)
        return
    with pytest.raises(ValueError, match="TANDEM_TEST_PORTS"):
        port_band()
