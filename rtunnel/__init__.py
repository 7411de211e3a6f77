"""
rtunnel: a reverse TCP tunnel for Twisted.

A site behind a firewall dials out over TLS to a tunnel server; the server then
opens TCP streams back into the site through that single connection.
"""

__version__ = "0.2.0"
