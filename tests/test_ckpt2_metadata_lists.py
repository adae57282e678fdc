"""``metadata.json`` read with its rank lists shared (``load_metadata``) is the document plain
JSON parsing gives, list for list; what JSON refuses, it refuses
(docs/checkpoint2.md#3-metadatajson)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ms2hf.errors import FormatError
from ms2hf.io.sources.ckpt2_metadata import load_metadata
from tests.conftest import examples

FIXTURES = sorted(Path(__file__).parent.glob("data-ckpt2/*/checkpoint/*/metadata.json"))


def plain(value: Any) -> Any:
    """Tuples as lists: what ``json`` itself gives."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.parts[-4])
def test_the_genuine_metadata_reads_as_json_reads_it(path: Path) -> None:
    assert plain(load_metadata(path)) == json.loads(path.read_bytes())


NAMES = st.text(st.characters(blacklist_characters="\x00"), max_size=8)
"""Without NUL, which makes a file be read without sharing (tested below)."""
ranks = st.lists(st.integers(0, 5000), max_size=40)
records = st.lists(
    st.fixed_dictionaries(
        {"file_name": st.sampled_from(["a-model-0-2.safetensors", "b"])},
        optional={"rank_group": ranks, "storage_rank": st.integers(0, 9)},
    ),
    min_size=1,
    max_size=3,
)
documents = st.fixed_dictionaries(
    {
        "state_dict_metadata": st.dictionaries(
            NAMES,
            st.fixed_dictionaries({"properties": st.fixed_dictionaries({"replica_id": ranks})}),
            max_size=3,
        ),
        "storage_data": st.dictionaries(NAMES, records, max_size=4),
    }
)


@settings(max_examples=examples(60), deadline=None)
@given(doc=documents, indent=st.sampled_from([None, 0, 1]), compact=st.booleans())
def test_any_document_reads_as_json_reads_it(
    doc: dict[str, Any], indent: int | None, compact: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("m") / "metadata.json"
    separators = (",", ":") if compact else None
    path.write_text(json.dumps(doc, indent=indent, separators=separators))
    got = load_metadata(path)
    assert plain(got) == doc
    groups = [r.get("rank_group") for recs in got["storage_data"].values() for r in recs]
    same: dict[tuple[int, ...], tuple[int, ...]] = {}
    for group in groups:  # long lists are shared: identical ones are one object
        if group is not None and len(json.dumps(group, separators=(",", ":"))) >= 34:
            assert isinstance(group, tuple) and same.setdefault(group, group) is group


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"s": [{"rank_group": [1,,2]}]}', "not valid JSON"),
        ('{"s": [{"rank_group": [01]}]}', "not valid JSON"),
        ('{"s": [{"rank_group": [1], "rank_group": [2]}]}', "names 'rank_group' twice"),
        ('{"s": [{"rank_group": [1, 2]', "not valid JSON"),
    ],
)
def test_what_json_refuses_is_refused(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "metadata.json"
    path.write_text(text)
    with pytest.raises(FormatError, match=message):
        load_metadata(path)


def test_a_file_holding_nul_escapes_is_read_without_sharing(tmp_path: Path) -> None:
    doc = {"\u0000x": [{"rank_group": "\u00000"}], "y": [{"rank_group": [3, 4]}]}
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(doc))
    assert load_metadata(path) == doc  # the string stays a string
