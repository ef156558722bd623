"""The HTTP server: protocol, Sanic app, metrics, startup."""
