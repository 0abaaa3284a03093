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
