"""wirestate.adapters: the thin I/O layer around the pure core (websockets server, HTTP, CLI)."""
