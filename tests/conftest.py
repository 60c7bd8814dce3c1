"""Hypothesis profiles: ``ci`` (CI=true) keeps the suite to a few minutes on 2 cores and
draws the same examples on every run (a red CI means the change broke something, not that
a new random example was drawn); ``dev`` draws new ones each run, to find bugs."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI", "").lower() == "true" else "dev")
