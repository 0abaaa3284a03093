"""How the kernels' build finds ninja: the venv's own first, so one ninja version keeps the build log."""

from __future__ import annotations

import os
import sys

from tokenloom import kernels


def _fake_bin(tmp_path, name: str, with_ninja: bool):
    d = tmp_path / name
    d.mkdir()
    if with_ninja:
        (d / "ninja").write_text("#!/bin/sh\n")
        (d / "ninja").chmod(0o755)
    return d


def test_the_ninja_next_to_the_interpreter_goes_ahead_of_the_systems(tmp_path, monkeypatch):
    venv, system = _fake_bin(tmp_path, "venv", True), _fake_bin(tmp_path, "system", True)
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.setenv("PATH", str(system))
    kernels._put_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep) == [str(venv), str(system)]
    kernels._put_ninja_on_path()  # already first: PATH does not grow
    assert os.environ["PATH"].split(os.pathsep) == [str(venv), str(system)]


def test_a_system_ninja_is_used_when_the_interpreter_has_none(tmp_path, monkeypatch):
    venv, system = _fake_bin(tmp_path, "venv", False), _fake_bin(tmp_path, "system", True)
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.setenv("PATH", str(system))
    kernels._put_ninja_on_path()
    assert os.environ["PATH"] == str(system)


def test_a_lock_left_by_a_killed_build_is_removed_and_builds_take_turns(tmp_path):
    """torch's builder waits forever on a ``lock`` file; one left by a killed process must not
    hang the next start. The flock that replaces it is released when its holder exits."""
    import fcntl
    import subprocess

    (tmp_path / "lock").write_text("")
    with kernels._exclusive(tmp_path):
        assert not (tmp_path / "lock").exists()
        # Another process cannot take the directory while we hold it...
        probe = ("import fcntl, sys; f = open(sys.argv[1], 'w')\n"
                 "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)")
        held = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "tokenloom.flock")])
        assert held.returncode == 3
    # ...and can once we let go.
    with open(tmp_path / "tokenloom.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
