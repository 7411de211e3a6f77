"""
The Twisted adapter: runs the sans-IO core over a transport and exposes each
stream as a Twisted transport with producer/consumer backpressure. It knows
nothing of sites, keyfiles or forwards.
"""

from .protocol import Keepalive, MuxProtocol, SessionEnded, StreamHandler, TunnelState
from .stream import MuxStream, StreamAddress, StreamConnection, StreamOpenFailed, StreamReset

__all__ = [
    "Keepalive",
    "MuxProtocol",
    "MuxStream",
    "SessionEnded",
    "StreamAddress",
    "StreamConnection",
    "StreamHandler",
    "StreamOpenFailed",
    "StreamReset",
    "TunnelState",
]
