"""wirestate.core: the pure core. No asyncio, sockets, threads, wall clock or randomness."""
