"""Hypothesis profiles, built on gradcheck's ``"gradcheck"`` profile (no deadline, ``too_slow``
suppressed): ``ci`` (default: derandomized, few examples) and ``thorough``.

Select with ``HYPOTHESIS_PROFILE=thorough tox`` for a long randomized search.
"""

import os

import torch
from hypothesis import settings

from gradcheck.strategies import PROFILE

settings.register_profile("ci", parent=settings.get_profile(PROFILE), derandomize=True, max_examples=25)
settings.register_profile("thorough", parent=settings.get_profile(PROFILE), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The test models are tiny: one thread per process is faster and keeps results reproducible.
torch.set_num_threads(1)
