"""Hypothesis profiles: `ci` (CI=true, derandomized, quick), `dev` (default locally) and `deep`.

Select one with HYPOTHESIS_PROFILE=deep (or --hypothesis-profile deep).
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", settings.get_profile("ci"), max_examples=100, stateful_step_count=40
)
settings.register_profile("dev", max_examples=100, stateful_step_count=40, deadline=None)
settings.register_profile(
    "deep",
    max_examples=5_000,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
elif not os.environ.get("CI"):
    settings.load_profile("dev")
