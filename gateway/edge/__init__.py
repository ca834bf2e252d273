"""The edge: what happens to a request at the callback URL, up to the outbox's commit.

TLS and the client's identity, Meta's handshake, the signature over the raw body, routing, the
callback's decisions in order, the error-to-response mapping, the acceptor that reads the PROXY
protocol header a load balancer may send first and completes each connection's TLS handshake,
and the HTTP/1.1 listener that adapts sockets to them. Rule: nothing here imports
:mod:`gateway.delivery`; a stored notification is announced through a hook (see
:mod:`gateway.edge.callback`).
"""
