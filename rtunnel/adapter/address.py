"""
How an address reads in log lines: L{rtunnel.address.describe}, re-exported
for the modules that import it from the adapter.
"""

from __future__ import annotations

from rtunnel.address import describe

__all__ = ["describe"]
