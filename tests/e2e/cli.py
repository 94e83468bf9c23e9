"""Run the real `punchline` command as a user would, and read what it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def punchline(
    *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "punchline", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def ok_json(*args: str, stdin: str | None = None) -> dict[str, Any]:
    result = punchline(*args, "--json", stdin=stdin)
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def signup(
    data: Path, name: str, url: str, password: str = "long enough pw", *extra: str
) -> dict[str, Any]:
    return ok_json(
        "signup",
        name,
        "--auth",
        url,
        "--data",
        str(data),
        "--password-stdin",
        *extra,
        stdin=password + "\n",
    )
