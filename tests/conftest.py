"""Suite-wide settings: under CI nothing may be skipped for lack of a tool."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI") == "true"


def unavailable(reason: str) -> None:
    """Skip on a developer machine, fail under CI: CI must run every test for real."""
    if IN_CI:
        pytest.fail(f"required under CI but unavailable: {reason}")
    pytest.skip(reason)
