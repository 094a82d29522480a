"""The paper's experiments as TOML files shipped in the package, one per preset (``NAME.toml`` beside this file).

A preset holds the paper's (full) settings; its ``[small]`` table, applied by ``small=True``, is a scaled-down
CPU form that finishes in minutes on 2 cores. Fields left out take ``RunConfig``'s defaults. ``supsup presets
show NAME`` prints a preset resolved; an edited copy runs with ``supsup run FILE.toml``.
"""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources
from pathlib import Path

from supsup.config import RunConfig, merge


@cache
def preset_names() -> tuple[str, ...]:
    """Every shipped preset, sorted."""
    return tuple(sorted(f.name.removesuffix(".toml") for f in resources.files(__name__).iterdir()
                        if f.name.endswith(".toml")))


def _read(name: str) -> dict:
    if name not in preset_names():
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())} (or give a "
                       f"config file, FILE.toml)")
    return tomllib.loads(resources.files(__name__).joinpath(f"{name}.toml").read_text())


def resolve(data: dict, preset: str, small: bool, where: str) -> RunConfig:
    """A config from a preset's or a file's TOML table; ``small`` merges in its ``[small]`` table."""
    data = dict(data)
    small_changes = data.pop("small", {})
    if small and not small_changes:
        raise ValueError(f"{where} has no [small] form: drop --small")
    data = {"preset": preset, **(merge(data, small_changes) if small else data)}
    return RunConfig.from_dict(data)


def get_preset(name: str, small: bool = False) -> RunConfig:
    """A preset's config (a fresh copy); ``small=True`` applies its scaled-down CPU form."""
    return resolve(_read(name), name, small, f"preset {name}")


def has_small(name: str) -> bool:
    return bool(_read(name).get("small"))


def read_config_file(path: str | Path, small: bool = False) -> RunConfig:
    """A config from a TOML file (an edited preset) or a JSON ``results.json`` (the config of a finished run).
    A TOML file without ``preset`` is named after the file."""
    import json

    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        data = data.get("config", data) if isinstance(data, dict) else data
        if small:
            raise ValueError(f"{path} is the config of a run, which has no [small] form: drop --small")
        return RunConfig.from_dict(data)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from err
    return resolve(data, data.pop("preset", path.stem), small, str(path))
