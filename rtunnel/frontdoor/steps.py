"""
What a front-door handshake reports to its adapter, shared by the SOCKS5
(L{rtunnel.frontdoor.socks5}) and HTTP CONNECT
(L{rtunnel.frontdoor.http_connect}) machines, so that one Twisted adapter
drives either.

Each call of C{receive} (and of C{credentials_checked}) returns one step:

 - L{NeedData}: nothing to decide yet; feed more bytes;
 - L{CheckCredentials}: the client sent a user name and password; check
   them (off the reactor: it is scrypt work) and call
   C{credentials_checked(ok)}. Bytes that arrive meanwhile are kept;
 - L{Request}: the request is complete and authenticated; route it, then
   C{accept()} (the success reply) or C{refuse(refusal)};
 - L{Refused}: the handshake itself refused; send what C{data_to_send()}
   holds (the protocol's own reply, if it has one) and close.

Pure Python (no Twisted).
"""

from __future__ import annotations

from typing import Protocol

from attrs import field, frozen

from .refusals import Refusal

__all__ = [
    "DEFAULT_MAX_EARLY_DATA",
    "NEED_DATA",
    "CheckCredentials",
    "Handshake",
    "NeedData",
    "Refused",
    "Request",
    "Step",
]

#: Bytes after the request, kept until the stream is open: one socket read
#: of Twisted's (64 KiB). The adapter stops reading once the request is
#: complete, so a client that sends the request and its first bytes at once
#: (a TLS ClientHello, an HTTP request) is served, while one that keeps
#: writing before the reply cannot make the front door hold more than this.
DEFAULT_MAX_EARLY_DATA = 64 * 1024


@frozen
class NeedData:
    """The handshake is incomplete: feed more bytes."""


NEED_DATA = NeedData()


@frozen
class CheckCredentials:
    """Check this user name and password, then call C{credentials_checked}."""

    user: str
    password: bytes = field(repr=False)


@frozen
class Request:
    """
    A complete CONNECT request for C{name}:C{port}.

    @ivar name: canonical (L{rtunnel.frontdoor.names.requested_name}).
    @ivar user: the authenticated user, or C{None} without authentication.
    """

    name: str
    port: int
    user: str | None = None


@frozen
class Refused:
    """The handshake refused the client; the reply is in C{data_to_send()}."""

    refusal: Refusal


Step = NeedData | CheckCredentials | Request | Refused


class Handshake(Protocol):
    """
    What the adapter uses of a handshake machine
    (L{rtunnel.frontdoor.socks5.Socks5Handshake},
    L{rtunnel.frontdoor.http_connect.HttpConnectHandshake}).
    """

    def receive(self, data: bytes) -> Step:
        """Bytes from the client; the step they lead to."""

    def credentials_checked(self, ok: bool) -> Step:
        """The outcome of a L{CheckCredentials} step; the step that follows."""

    def accept(self) -> None:
        """Queue the success reply (after a L{Request})."""

    def refuse(self, refusal: Refusal) -> Refused:
        """Queue the protocol's reply for C{refusal}, drop what was kept, stay refused."""

    def data_to_send(self) -> bytes:
        """Bytes to write to the client now."""

    def take_early_data(self) -> bytes:
        """Once accepted: the bytes the client sent after its request, for the stream."""
