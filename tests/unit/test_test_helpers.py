"""The tests' own helpers in tests/conftest.py: the port picker (launchers and spawned ranks get ports
that nothing else on the machine is handed, so two test runs side by side cannot take each other's), and
the line a failed `pretrain` child's report starts with."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import DEFAULT_TEST_PORTS, free_port, last_error_line, port_band


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


def _two_bindable_ports() -> int:
    """The lower of two adjacent ports, in the default band, that nothing is bound to."""
    lo, hi = DEFAULT_TEST_PORTS
    return next(p for p in range(lo, hi) if conftest._bindable(p) and conftest._bindable(p + 1))


def test_ports_are_in_the_band_distinct_and_skip_a_bound_one(monkeypatch):
    monkeypatch.setattr(conftest, "_handed_out", set())  # this process's earlier picks do not count
    monkeypatch.setenv("TANDEM_TEST_PORTS", "23000-23099")
    got = [free_port() for _ in range(5)]
    assert len(set(got)) == 5 and all(23000 <= p <= 23099 for p in got), got

    # A band of two ports, one of them held by a listener: free_port must hand out the other one, then
    # have nothing left, whichever of the two it tries first.
    lo = _two_bindable_ports()
    for held_port in (lo, lo + 1):
        monkeypatch.setattr(conftest, "_handed_out", set())
        monkeypatch.setenv("TANDEM_TEST_PORTS", f"{lo}-{lo + 1}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
            held.bind(("", held_port))
            held.listen()
            assert free_port() == (lo + 1 if held_port == lo else lo)
            with pytest.raises(RuntimeError, match="TANDEM_TEST_PORTS"):
                free_port()


def test_no_band_set_is_the_default(monkeypatch):
    monkeypatch.delenv("TANDEM_TEST_PORTS", raising=False)
    assert port_band() == DEFAULT_TEST_PORTS
    monkeypatch.setenv("TANDEM_TEST_PORTS", "")
    assert port_band() == DEFAULT_TEST_PORTS


@pytest.mark.parametrize("text", ["23000", "2-1", "70000-70010", "a-b", "30000-20000", "100-200"])
def test_a_malformed_band_is_refused_naming_the_variable(monkeypatch, text):
    monkeypatch.setenv("TANDEM_TEST_PORTS", text)
    with pytest.raises(ValueError, match="TANDEM_TEST_PORTS"):
        port_band()


def test_a_failed_child_is_reported_by_its_exception_line():
    stderr = (
        "Traceback (most recent call last):\n"
        '  File "pretrain/distributed.py", line 73, in init_distributed\n'
        "torch.distributed.DistNetworkError: The server socket has failed to listen ... EADDRINUSE\n"
        "[INFO] [launch.py:253:sigkill_handler] Killing subprocess 12766\n"
    )
    assert last_error_line(stderr).startswith("torch.distributed.DistNetworkError: The server socket")
    assert last_error_line("no exception here\n\n") == "no exception here"
    assert last_error_line("") == "(no stderr)"
