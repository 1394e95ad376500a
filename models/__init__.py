"""wirestate.models: pydantic v2 models at the edge (wire messages, settings, payloads)."""
