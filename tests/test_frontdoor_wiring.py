"""
The front doors' wiring (rtunnel/frontdoor/wiring.py): endpoints made
loopback, the start-time rule beyond loopback, and the directory of known
sites over the admission snapshot and the registry.
"""

from __future__ import annotations

from datetime import UTC, datetime

import attrs
import pytest
from twisted.internet.task import Clock

from rtunnel.address import HostPort
from rtunnel.frontdoor.names import Route, route
from rtunnel.frontdoor.refusals import Refusal, RefusalKind
from rtunnel.frontdoor.wiring import FrontDoorError, KnownSites, check_front_doors, loopback_endpoint
from rtunnel.identity.store import AdmissionSnapshot, SiteAdmission
from rtunnel.roles.registry import SiteRegistry


@pytest.mark.parametrize(
    ("given", "listened", "interface"),
    [
        ("1080", "tcp:1080:interface=127.0.0.1:backlog=1024", "127.0.0.1"),
        ("tcp:1080", "tcp:1080:interface=127.0.0.1:backlog=1024", "127.0.0.1"),
        ("tcp6:1080", "tcp6:1080:interface=\\:\\:1:backlog=1024", "::1"),
        ("tcp:1080:interface=0.0.0.0", "tcp:1080:interface=0.0.0.0:backlog=1024", "0.0.0.0"),
        ("tcp:1080:10.1.2.3", "tcp:1080:10.1.2.3:backlog=1024", "10.1.2.3"),
        ("tcp6:port=1080:interface=\\:\\:", "tcp6:port=1080:interface=\\:\\::backlog=1024", "::"),
        ("tcp:1080:backlog=5", "tcp:1080:backlog=5:interface=127.0.0.1", "127.0.0.1"),
        ("unix:/run/rtunnel/socks", "unix:/run/rtunnel/socks:backlog=1024", None),
    ],
)
def test_endpoints_are_loopback_unless_they_name_an_interface(given, listened, interface):
    assert loopback_endpoint(given) == (listened, interface)


def test_other_endpoint_types_are_refused():
    with pytest.raises(FrontDoorError, match="tcp:, tcp6:, ssl: or unix:"):
        loopback_endpoint("systemd:domain=INET:index=0")


@attrs.frozen
class Doors:
    socks: str | None = None
    connect_proxy: str | None = None
    domain: str = "rtunnel.internal"
    proxy_users: str | None = None
    open_timeout: float = 5.0


def test_beyond_loopback_without_users_is_refused_with_the_reason():
    with pytest.raises(FrontDoorError) as raised:
        check_front_doors(Doors(connect_proxy="tcp:3128:interface=0.0.0.0"))
    assert "--connect-proxy listens on 0.0.0.0, beyond loopback, without --proxy-users" in str(raised.value)
    assert "would let anyone who can reach it reach every site" in str(raised.value)


def test_loopback_or_users_or_unix_are_accepted():
    assert check_front_doors(Doors()) == []
    assert len(check_front_doors(Doors(socks="1080", connect_proxy="tcp6:3128"))) == 2
    assert len(check_front_doors(Doors(socks="tcp:1080:interface=0.0.0.0", proxy_users="/etc/users"))) == 1
    assert len(check_front_doors(Doors(socks="unix:/run/socks"))) == 1


def test_a_bad_domain_is_refused():
    with pytest.raises(FrontDoorError, match="--domain"):
        check_front_doors(Doors(socks="1080", domain="10.0.0.1"))


class _Session:
    """What the registry reads of a session to call it live."""

    accepting_streams = True
    peer_label = "test"

    def on_closed(self, *args: object) -> None:
        pass


def _admitted(enrolled: bool = True, revoked: bool = False) -> SiteAdmission:
    return SiteAdmission(enrolled, "f" * 64, datetime(2026, 1, 1, tzinfo=UTC) if revoked else None)


def test_known_sites_are_enrolled_and_not_revoked_or_connected():
    admission = AdmissionSnapshot(
        {"store-17": _admitted(), "pending": _admitted(enrolled=False), "gone": _admitted(revoked=True)}
    )
    registry = SiteRegistry(Clock())
    registry.register("live-only", _Session(), "127.0.0.1:1")  # type: ignore[arg-type]
    directory = KnownSites(admission, registry)
    assert "store-17" in directory and "live-only" in directory
    assert "pending" not in directory and "gone" not in directory and "nosuch" not in directory
    assert sorted(directory) == ["live-only", "store-17"]
    assert len(directory) == 2
    assert directory["store-17"] == {}


def test_names_route_through_the_directory_with_services():
    services = {"store-17": {"directory": HostPort("10.0.0.5", 389)}}
    directory = KnownSites(
        AdmissionSnapshot({"store-17": _admitted()}), SiteRegistry(Clock()), lambda site: services.get(site, {})
    )
    d = "rtunnel.internal"
    assert route(f"directory.store-17.{d}", 389, d, directory) == Route("store-17", "10.0.0.5", 389, "directory")
    assert route(f"10.0.0.7.store-17.{d}", 80, d, directory) == Route("store-17", "10.0.0.7", 80)
    wrong = route(f"directory.store-17.{d}", 80, d, directory)
    assert isinstance(wrong, Refusal) and wrong.kind is RefusalKind.SERVICE_WRONG_PORT
    unknown = route(f"x.store-18.{d}", 80, d, directory)
    assert isinstance(unknown, Refusal) and unknown.kind is RefusalKind.UNKNOWN_SITE
