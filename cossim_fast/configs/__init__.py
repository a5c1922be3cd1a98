"""Shipped training configs, usable by name: ``cossim-fast train --config synthetic``."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent


def names() -> list[str]:
    return sorted(path.stem for path in FOLDER.glob("*.yaml"))


def resolve(name_or_path: str) -> Path:
    """A shipped config's path by name, or the given file path (a YAML name or an existing file:
    a folder named like a shipped config, such as data/synthetic, does not hide it)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    shipped = FOLDER / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise FileNotFoundError(f"no config file {name_or_path!r} and no shipped config of that name (shipped: {', '.join(names())})")
    return shipped
