"""Test-suite settings.

Hypothesis runs derandomized by default, so that a failure in CI reproduces on any machine; set
``FXLORA_HYPOTHESIS_PROFILE=random`` to explore new examples (the property test of the passes has its
own seed, ``FXLORA_HYPOTHESIS_SEED``, fixed by default and printed with any failure).

The suite runs in parallel (pytest-xdist, ``-n auto``, at most 4 workers: see pyproject.toml); each worker
gets its share of the cores for torch's threads, so that workers do not oversubscribe them.  ``-n 0`` runs
it in one process.
"""

from __future__ import annotations

import os

import torch
from hypothesis import settings

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

settings.register_profile("fxlora", derandomize=True, print_blob=True)
settings.register_profile("random", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("FXLORA_HYPOTHESIS_PROFILE", "fxlora"))
