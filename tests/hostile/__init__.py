"""Hostile clients: fuzzing every RPC, concurrency, and memory over many cycles."""
