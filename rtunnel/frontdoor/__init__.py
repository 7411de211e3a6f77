"""
The front door: SOCKS5 and HTTP CONNECT on the tunnel server, routing
requests by name (C{SERVICE.SITE.D}, C{HOST.SITE.D}) to streams at the sites.

 - L{rtunnel.frontdoor.socks5}, L{rtunnel.frontdoor.http_connect}: the two
   handshakes, sans-IO, reporting L{rtunnel.frontdoor.steps};
 - L{rtunnel.frontdoor.names}: which site and HOST:PORT a name reaches;
 - L{rtunnel.frontdoor.refusals}: every refusal, and its SOCKS5 code, HTTP
   status and log wording, in one table;
 - L{rtunnel.frontdoor.users}: the C{--proxy-users} file (scrypt hashes);
 - L{rtunnel.frontdoor.protocol}: the Twisted adapter, which opens streams
   through the server's L{rtunnel.roles.registry.SiteRegistry} and splices
   them as a forward does.

Only C{protocol} imports Twisted; importing this package imports nothing.
"""
