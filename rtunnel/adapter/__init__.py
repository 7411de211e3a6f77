"""
The Twisted adapter: runs the sans-IO core over a transport and exposes each
stream as a Twisted transport with producer/consumer backpressure. It knows
nothing of sites, keyfiles or forwards.
"""

from .protocol import Keepalive, MuxProtocol, StreamHandler
from .stream import MuxStream, StreamAddress, StreamOpenFailed, StreamReset

__all__ = [
    "Keepalive",
    "MuxProtocol",
    "MuxStream",
    "StreamAddress",
    "StreamHandler",
    "StreamOpenFailed",
    "StreamReset",
]
