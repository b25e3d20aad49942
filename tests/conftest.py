"""Hypothesis profiles: ``ci`` (default: derandomized, no deadline, few examples) and ``thorough``.

Select with ``HYPOTHESIS_PROFILE=thorough tox`` for a long randomized search.
"""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=300,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The test models are tiny: one thread per process is faster and keeps results reproducible.
torch.set_num_threads(1)
