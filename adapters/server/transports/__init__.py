"""Transports: they move a connection's bytes and nothing else."""
