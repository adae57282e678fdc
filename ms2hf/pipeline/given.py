"""Where the values the weights cannot tell come from, and saying so.

A reference config, the training yaml and command-line flags each give ``{name: ConfigValue}``.
Two files that state one setting differently are an error rather than a silent pick: a wrong
rope theta or epsilon gives a model that loads fine and generates nonsense. Flags are the user's
explicit word and override both files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ms2hf.errors import Ms2hfError
from ms2hf.io.config_files import ConfigValue, Given, read_reference_config, read_train_config


def given_values(
    reference: Path | None, train_yaml: Path | None, flags: Mapping[str, ConfigValue]
) -> Given:
    """The reference config's values, then the training yaml's, then the flags."""
    files = [
        read_reference_config(reference) if reference else {},
        read_train_config(train_yaml) if train_yaml else {},
    ]
    merged: Given = {}
    for source in files:
        for name, given in source.items():
            if name in merged and merged[name].value != given.value:
                raise Ms2hfError(
                    f"{merged[name].origin} = {merged[name].value!r} and {given.origin} = "
                    f"{given.value!r} disagree; make the two files agree, or give only one of them"
                )
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
