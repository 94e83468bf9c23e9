"""Atomic, permission-exact writes."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from punchline.util.files import atomic_write, private_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """A umask that would strip group/other bits if atomic_write relied on os.open's mode."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_default_mode_is_0600(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    atomic_write(target, b"data")
    assert target.read_bytes() == b"data"
    assert mode(target) == 0o600
    assert os.listdir(tmp_path) == ["secret"]


@pytest.mark.usefixtures("strict_umask")
@pytest.mark.parametrize("wanted", [0o600, 0o640, 0o644, 0o400])
def test_mode_is_as_given(tmp_path: Path, wanted: int) -> None:
    target = tmp_path / "file"
    atomic_write(target, b"data", mode=wanted)
    assert mode(target) == wanted
    assert os.listdir(tmp_path) == ["file"]


def test_replaces_existing_file_and_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"old contents that are longer")
    os.chmod(target, 0o666)  # noqa: S103 - loose on purpose
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert os.listdir(tmp_path) == ["file"]


def test_stale_temp_file_is_reused_and_removed(tmp_path: Path) -> None:
    target = tmp_path / "file"
    stale = tmp_path / f".file.{os.getpid()}.tmp"
    stale.write_bytes(b"left over from a crash, much longer than the new data")
    os.chmod(stale, 0o666)  # noqa: S103 - loose on purpose
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert os.listdir(tmp_path) == ["file"]


def test_failed_replace_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()  # a directory cannot be replaced by a file
    (target / "keep").write_bytes(b"x")
    with pytest.raises(OSError):  # noqa: PT011 - platform picks IsADirectoryError or similar
        atomic_write(target, b"data")
    assert os.listdir(tmp_path) == ["target"]
    assert os.listdir(target) == ["keep"]


def test_private_dir(tmp_path: Path) -> None:
    path = private_dir(tmp_path / "a" / "b")
    assert path.is_dir()
    assert mode(path) == 0o700
    os.chmod(path, 0o755)  # noqa: S103 - loose on purpose
    private_dir(path)
    assert mode(path) == 0o700
