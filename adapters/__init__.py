"""wirestate.adapters: the I/O around the pure core, in three parts: ``server`` (the service
and its transports), ``client`` (the subscriber, the probe, the follower) and ``tools`` (the
command line, load test, fuzzer, fault proxy, docs generator). docs/architecture.md says
who may import whom."""
