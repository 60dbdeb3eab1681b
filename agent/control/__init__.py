"""The control socket: a JSON-lines API on a Unix socket for cabinetctl (server and client).

Kept import-light on purpose: the client side needs only the standard library.
"""
