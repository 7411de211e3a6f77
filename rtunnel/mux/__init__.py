"""
The sans-IO multiplexer core: frames, stream states, flow control.

Nothing here imports Twisted or touches a socket or a clock; see
docs/protocol.md for the wire protocol it implements.
"""

from .errors import ErrorCode, MuxUsageError, ProtocolError, SessionClosing, StreamLimitReached, code_name
from .session import MuxSession
from .settings import Allowance, FloodLimits, Settings
from .streams import StreamState

__all__ = [
    "Allowance",
    "ErrorCode",
    "FloodLimits",
    "MuxSession",
    "MuxUsageError",
    "ProtocolError",
    "SessionClosing",
    "Settings",
    "StreamLimitReached",
    "StreamState",
    "code_name",
]
