"""Test-suite settings.

Hypothesis runs derandomized by default, so that a failure in CI reproduces on any machine; set
``FXLORA_HYPOTHESIS_PROFILE=random`` to explore new examples (the property test of the passes has its
own seed, ``FXLORA_HYPOTHESIS_SEED``, fixed by default and printed with any failure).
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("fxlora", derandomize=True, print_blob=True)
settings.register_profile("random", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("FXLORA_HYPOTHESIS_PROFILE", "fxlora"))
