"""The verification kit: invariant checks, exhaustive explorers, planted bugs, Hypothesis
state machines and the deterministic simulation. It imports the runtime; the runtime never
imports it."""
