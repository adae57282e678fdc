"""Where the values the weights cannot tell come from, and saying so.

A reference config, the training yaml and command-line flags each give ``{name: ConfigValue}``.
Two files that state one setting differently are an error rather than a silent pick: a wrong
rope theta or epsilon gives a model that loads fine and generates nonsense. The disagreement is
kept on the value and reported with every other problem of the run (``ms2hf.transforms.registry``)
so that one run lists them all. Flags are the user's explicit word: they override both files and
settle a disagreement (``--set max_position_embeddings=40960``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ms2hf.errors import Ms2hfError
from ms2hf.io.config_files import ConfigValue, Given, read_reference_config, read_train_config
from ms2hf.transforms.registry import settable_keys

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as typed after ``--set``: VALUE is JSON (``40960``, ``1e-6``, ``true``,
    ``null``, ``[1, 2]``, ``{"rope_type": "yarn", ...}``), True/False/None as Python spells them,
    or else a plain string."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not _KEY.match(key):
        raise Ms2hfError(f"--set {text!r}: expected KEY=VALUE, e.g. max_position_embeddings=40960")
    raw = raw.strip()
    if raw.lower() in _WORDS:
        return key, _WORDS[raw.lower()]
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def settings(values: Mapping[str, Any], origin: str) -> Given:
    """Plain values (``{"max_position_embeddings": 40960}``) as given values of ``origin``."""
    return {
        key: value if isinstance(value, ConfigValue) else ConfigValue(value, f"{origin}: {key}")
        for key, value in values.items()
    }


def check_settable(flags: Mapping[str, ConfigValue]) -> None:
    """A flag must name a config.json entry ms2hf writes or checks: a typo must not vanish."""
    known = settable_keys()
    unknown = sorted(name for name in flags if name not in known)
    if unknown:
        raise Ms2hfError(
            f"{', '.join(flags[n].origin for n in unknown)}: not a config.json setting ms2hf "
            f"writes; settable: {', '.join(sorted(known))}"
        )


def given_values(
    reference: Path | None, train_yaml: Path | None, flags: Mapping[str, ConfigValue]
) -> Given:
    """The reference config's values, then the training yaml's, then the flags. A setting the
    two files state differently keeps the disagreement (``ConfigValue.disagrees``) unless a flag
    settles it."""
    check_settable(flags)
    files = [
        read_reference_config(reference) if reference else {},
        read_train_config(train_yaml) if train_yaml else {},
    ]
    merged: Given = {}
    for source in files:
        for name, given in source.items():
            kept = merged.get(name)
            if kept is not None and kept.value != given.value:
                given = ConfigValue(kept.value, kept.origin, (*kept.disagrees, given))
            merged[name] = given
    merged.update(flags)
    return merged


def origin_lines(config: Mapping[str, ConfigValue]) -> list[str]:
    """One line per source naming the config.json entries it gave, for the run's log; sources in
    the order the config was built (model, weights, defaults, then the user's). An origin
    ``"file: key"`` is grouped under its file, the key said where it is not the entry's name."""
    by_source: dict[str, list[str]] = {}
    for value in config.values():
        by_source.setdefault(value.origin.partition(": ")[0], [])
    for name, value in sorted(config.items()):
        source, _, key = value.origin.partition(": ")
        where = f" ({key})" if key and key != name else ""
        by_source[source].append(f"{name}={value.value!r}{where}")
    return [f"  {source}: {', '.join(items)}" for source, items in by_source.items()]
