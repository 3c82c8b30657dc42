"""Plumbing: Redis and broker endpoints, the broker transport and message consumer, transient
infrastructure errors, start-up checks, the embedded Valkey, the per-process runtime, logging and
metrics."""
