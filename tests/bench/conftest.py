"""The bench tests drive the same tiny-model server the server tests use."""

from __future__ import annotations

from tests.server.conftest import tiny_server  # noqa: F401  (re-exported fixture)
