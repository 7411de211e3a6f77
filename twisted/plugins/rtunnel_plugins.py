# Dropin for Twisted's plugin system: no __init__.py in twisted/ or twisted/plugins/.
# Keep it to ServiceMaker lines and the endpoint parser: everything else lives in rtunnel.
from twisted.application.service import ServiceMaker

from rtunnel.endpoints import SiteEndpointParser

rtunnelServer = ServiceMaker(
    "rtunnel tunnel server",
    "rtunnel.cli.server_tap",
    "Reverse TCP tunnel, cloud role: accept sites over TLS and forward ports into them",
    "rtunnel-server",
)
rtunnelSite = ServiceMaker(
    "rtunnel site tunnel",
    "rtunnel.cli.site_tap",
    "Reverse TCP tunnel, site role: dial out to the tunnel server and serve allowed targets",
    "rtunnel",
)
rtunnelEndpoint = SiteEndpointParser()
