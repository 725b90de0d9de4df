"""The cosserve server: session store, operator registry and the gRPC servicer (needs torch)."""
