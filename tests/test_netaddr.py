import pytest

from pdserve import netaddr


def test_loopback_nats_gives_a_loopback_address():
    assert netaddr.detect_advertise_host("nats://127.0.0.1:4222") == "127.0.0.1"
    assert netaddr.is_loopback("127.0.0.1") and netaddr.is_loopback("localhost")


def test_a_routed_nats_host_gives_a_non_loopback_interface():
    """No packet is sent: a UDP connect only asks the kernel for the route to a documentation address."""
    try:
        host = netaddr.detect_advertise_host("nats://192.0.2.1:4222")
    except OSError:
        pytest.skip("no route out of this machine")
    assert not netaddr.is_loopback(host)


def test_unresolvable_nats_host_names_the_fix():
    with pytest.raises(ValueError, match="--advertise-host"):
        netaddr.detect_advertise_host("nats://no-such-host.invalid:4222")


def test_tcp_urls_bracket_ipv6():
    assert netaddr.tcp_url("10.0.0.1", 5) == "tcp://10.0.0.1:5"
    assert netaddr.tcp_url("::1", 5) == "tcp://[::1]:5"
