"""A Flower App Bundle (FAB) read without unpacking or importing it: identity, hash, files, sources.

A FAB is a zip holding pyproject.toml, the app's files and `.info/CONTENT` (one `path,sha256,bits` line per
file). Its SHA-256 over the zip's bytes is the hash Flower computes (`flwr build`, the SuperNode's Fab).
Everything here reads the archive in memory: nothing is extracted where Python could import it.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import re
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from medfusion_fl.config_sources import flatten
from medfusion_fl.errors import ConfigError

HASH_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
MAX_FAB_BYTES = 10_000_000  # Flower's FAB_MAX_SIZE


def parse_hash(text: str) -> str:
    """A FAB hash as 64 lower-case hex digits (an optional `sha256:` prefix is dropped)."""
    match = HASH_RE.match(text.strip().lower())
    if match is None:
        raise ConfigError(f"{text!r} is not an app hash: expected 64 hex digits (optionally 'sha256:...'), as "
                          "printed by `medfusion-fl site review` or in the site's refusal")
    return match.group(1)


@dataclass(frozen=True)
class FabInfo:
    """What a reviewer needs to know about a FAB, read from its bytes."""

    sha256: str
    publisher: str
    name: str
    version: str
    files: tuple[tuple[str, int], ...]  # (path, size in bytes), as listed in the archive
    sources: dict[str, str]  # every .py file's text
    size: int
    config: dict[str, object] = field(default_factory=dict)  # [tool.flwr.app.config], flat: the run defaults

    @property
    def app_id(self) -> str:
        return f"{self.publisher}/{self.name}"

    @property
    def short(self) -> str:
        return f"sha256:{self.sha256[:12]}"


def read_fab(content: bytes, *, where: str = "FAB") -> FabInfo:
    """Parse a FAB's bytes; a clear ConfigError for anything that is not a valid FAB."""
    if len(content) > MAX_FAB_BYTES:
        raise ConfigError(f"{where}: {len(content)} bytes is larger than a FAB may be ({MAX_FAB_BYTES})")
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except zipfile.BadZipFile:
        raise ConfigError(f"{where} is not a FAB: not a zip archive (build one with `flwr build`)") from None
    with archive:
        names = archive.namelist()
        for name in names:
            if name.startswith("/") or ".." in Path(name).parts:
                raise ConfigError(f"{where}: entry {name!r} points outside the app folder; refusing this FAB")
        if "pyproject.toml" not in names or ".info/CONTENT" not in names:
            raise ConfigError(f"{where} is not a FAB: it lacks pyproject.toml or .info/CONTENT")
        try:
            data = {name: archive.read(name) for name in names if not name.endswith("/")}
        except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
            raise ConfigError(f"{where}: the archive is damaged ({exc})") from None
    _check_manifest(data, where)
    try:
        project = tomllib.loads(data["pyproject.toml"].decode("utf-8"))
        publisher = str(project["tool"]["flwr"]["app"]["publisher"])
        name, version = str(project["project"]["name"]), str(project["project"]["version"])
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: its pyproject.toml lacks [project] name/version or [tool.flwr.app] "
                          f"publisher ({exc!r})") from None
    sources = {}
    for path, raw in data.items():
        if path.endswith(".py"):
            sources[path] = raw.decode("utf-8", errors="replace")
    files = tuple((path, len(raw)) for path, raw in data.items() if not path.startswith(".info/"))
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    config = flatten(app.get("config", {})) if isinstance(app.get("config"), dict) else {}
    return FabInfo(hashlib.sha256(content).hexdigest(), publisher, name, version, files, sources, len(content), config)


def _check_manifest(data: dict[str, bytes], where: str) -> None:
    """Every file listed in .info/CONTENT is there with its hash, and nothing else is."""
    listed = set()
    for number, line in enumerate(data[".info/CONTENT"].decode("utf-8", errors="replace").splitlines(), 1):
        parts = line.split(",")
        if len(parts) != 3:
            raise ConfigError(f"{where}: .info/CONTENT line {number} is not 'path,sha256,bits': {line!r}")
        path, digest = parts[0], parts[1]
        if path not in data or hashlib.sha256(data[path]).hexdigest() != digest:
            raise ConfigError(f"{where}: {path} does not match the hash in .info/CONTENT; the FAB was altered")
        listed.add(path)
    extra = sorted(set(data) - listed - {".info/CONTENT"})
    if extra:
        raise ConfigError(f"{where}: files not listed in .info/CONTENT: {extra[:5]}; the FAB was altered")


def read_fab_file(path: Path) -> FabInfo:
    try:
        content = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: pass a .fab file, an app folder or a 64-hex app hash") from None
    return read_fab(content, where=str(path))


def build_app(folder: Path) -> bytes:
    """The FAB Flower builds from an app folder (`flwr build`, `flwr run`): the same bytes, so the same hash."""
    from flwr.cli.build import build_fab_from_disk

    try:
        return build_fab_from_disk(Path(folder))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{folder}: cannot build a FAB from this folder ({exc})") from None


def source_diff(old: FabInfo, new: FabInfo) -> str:
    """The unified diff of the Python sources of two FABs (files added or removed included)."""
    chunks: list[str] = []
    for path in sorted(set(old.sources) | set(new.sources)):
        before, after = old.sources.get(path, ""), new.sources.get(path, "")
        if before != after:
            chunks.extend(difflib.unified_diff(
                before.splitlines(keepends=True), after.splitlines(keepends=True),
                fromfile=f"{old.short}/{path}" if path in old.sources else "/dev/null",
                tofile=f"{new.short}/{path}" if path in new.sources else "/dev/null"))
    return "".join(chunks)
