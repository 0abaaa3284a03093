"""Engine tests run on ``tiny_checkpoint`` (tests/conftest.py) and need transformers."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
