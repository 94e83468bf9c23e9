"""Checks of the machine punchline runs on, with the fix spelled out when one fails.

OpenDHT comes from Debian (python3-opendht) and is only importable from Debian's own Python,
so the virtual environment must be made from /usr/bin/python3 with --system-site-packages.
"""

from __future__ import annotations

import importlib
import sys

from punchline.errors import LocalError

OPENDHT_FIX = (
    "OpenDHT's Python module cannot be imported ({reason}). The global index needs it.\n"
    "Fix, as root on Debian:\n"
    "  apt-get install -y python3-opendht\n"
    "  /usr/bin/python3 -m venv --system-site-packages .venv && .venv/bin/pip install -e .\n"
    "or simply run ./tools/run demo, which does both. (This Python is {python}.)"
)


class MissingDependency(LocalError):
    """Something punchline needs is not installed; the message says how to install it."""


def opendht_problem() -> str | None:
    try:
        importlib.import_module("opendht")
    except ImportError as exc:
        return OPENDHT_FIX.format(reason=exc, python=sys.executable)
    return None


def require_opendht() -> None:
    problem = opendht_problem()
    if problem:
        raise MissingDependency(problem)
