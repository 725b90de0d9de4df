"""The edge: the servicers over a real server, interceptors (auth, request ids, metrics), TLS, start-up, settings."""
