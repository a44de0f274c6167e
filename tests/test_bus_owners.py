"""A partition lease's bookkeeping (async_logging.bus.owners.Lease): sans-I/O."""

from __future__ import annotations

from async_logging.bus.owners import Lease, holder_name


def test_a_lease_is_renewed_every_third_and_trusted_for_two_thirds_of_its_ttl() -> None:
    lease = Lease(ttl=30.0)
    assert not lease.held and not lease.due(0.0) and not lease.trusted(0.0)
    lease.took(7, 100.0)
    assert lease.held and lease.revision == 7
    assert not lease.due(109.9) and lease.due(110.0)
    assert lease.trusted(119.9) and not lease.trusted(120.0)
    lease.took(8, 120.0)  # renewed: trusted again from then
    assert lease.trusted(139.9) and not lease.due(129.9)
    lease.lost()
    assert not lease.held and not lease.due(200.0) and not lease.trusted(120.5)


def test_two_processes_never_write_the_same_holder_name() -> None:
    a, b = holder_name("web-1"), holder_name("web-1")
    assert a != b and a.startswith("web-1 pid ") and b.startswith("web-1 pid ")
