"""Start a login server as a separate process and wait until it serves.

Used by `punchline demo` and the test suite: a real process, killed for real.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from punchline.auth.server import READY_FILE, read_ready
from punchline.errors import LocalError


class ServerStartFailed(LocalError):
    """The login server process exited or did not become ready in time."""


@dataclass
class AuthProcess:
    data_dir: Path
    process: subprocess.Popen[bytes]
    url: str
    ca_fingerprint: str
    log_path: Path
    args: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up, like a power cut for the process."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start(
    data_dir: Path,
    listen: str = "127.0.0.1:0",
    extra_args: list[str] | None = None,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> AuthProcess:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (data_dir / READY_FILE).unlink(missing_ok=True)
    log_path = data_dir / "server.log"
    args = [
        sys.executable, "-m", "punchline", "auth", "serve",
        "--data", str(data_dir), "--listen", listen, *(extra_args or []),
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = read_ready(data_dir)
        if ready and ready.get("pid") == process.pid:
            return AuthProcess(
                data_dir, process, str(ready["url"]), str(ready["ca_fingerprint"]), log_path, args
            )
        if process.poll() is not None:
            break
        time.sleep(0.05)
    server = AuthProcess(data_dir, process, "", "", log_path, args)
    server.kill()
    raise ServerStartFailed(f"login server did not start; its log ends with:\n{server.log_tail()}")
