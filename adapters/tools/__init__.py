"""Tools: the command line, the load test and its lean client, the wire fuzzer, the fault
proxy and the docs generator."""
