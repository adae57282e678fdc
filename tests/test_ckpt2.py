"""Checkpoint 2.0 as a source (``docs/checkpoint2.md``): the genuine fixtures convert bit-exact
and equal their legacy twins; the paths a user may give; which iteration is read and when none
is; optimizer files are never opened; and what a legacy source does, this one does too
(replicas, whole tensors, one card, verify, merge, the API)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import ms2hf
from ms2hf.cli import main
from ms2hf.commands.convert import ConvertOptions, convert
from ms2hf.commands.merge import MergeOptions, merge
from ms2hf.commands.verify import verify
from ms2hf.errors import FormatError, LayoutError
from ms2hf.generator import GeneratorConfig, generate
from ms2hf.io.safetensors_reader import SafetensorsHeader
from tests.conftest import (
    CKPT2_TWINS,
    DATA,
    DATA_CKPT2,
    assert_matches_ground_truth,
    folder_bytes,
    load_hf_dir,
    load_tensors,
    run_cli,
)

FIXTURES = sorted(CKPT2_TWINS)
ITERATION = "iteration_00001000"
TRACKER = "latest_checkpointed_iteration.txt"
SMALL = {"layers": 2, "hidden": 32, "heads": 2, "groups": 1, "head_dim": 8, "ffn": 16, "vocab": 32}
"""A model small enough to generate in milliseconds."""


def quiet(**options: object) -> ConvertOptions:
    return ConvertOptions(progress=False, **options)


@pytest.fixture(scope="module")
def legacy_outputs() -> dict[tuple[str, str], Path]:
    """The legacy twins, converted once per dtype."""
    return {}


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "source"])
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_converts_bit_exact_and_equals_its_legacy_twin(
    name: str,
    dtype: str,
    tmp_path: Path,
    legacy_outputs: dict[tuple[str, str], Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    fixture = DATA_CKPT2 / name
    out = tmp_path / "hf"
    convert(fixture, out, quiet(dtype=dtype, workers=2))
    assert_matches_ground_truth(out, fixture, dtype)
    twin = (CKPT2_TWINS[name], dtype)
    if twin not in legacy_outputs:
        legacy_outputs[twin] = tmp_path_factory.mktemp("legacy") / "hf"
        convert(DATA / twin[0], legacy_outputs[twin], quiet(dtype=dtype))
    assert folder_bytes(out) == folder_bytes(legacy_outputs[twin])  # config.json and index too


# --- where the checkpoint is -----------------------------------------------------------------


def test_every_form_of_the_path_converts_alike(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The training output, its checkpoint/ folder, an iteration folder, --checkpoint-dir: one
    output, and the log says which format was found and which iteration was read."""
    fixture = DATA_CKPT2 / "tiny_tied_fp32_tp2pp2_dedup"
    outputs = []
    with caplog.at_level(logging.INFO, logger="ms2hf"):
        for i, path in enumerate(
            [fixture, fixture / "checkpoint", fixture / "checkpoint" / ITERATION]
        ):
            convert(path, tmp_path / str(i), quiet())
            outputs.append(folder_bytes(tmp_path / str(i)))
        convert(None, tmp_path / "dir", quiet(), checkpoint_dir=fixture / "checkpoint")
    assert outputs[0] == outputs[1] == outputs[2] == folder_bytes(tmp_path / "dir")
    found = [r.getMessage() for r in caplog.records if "Checkpoint 2.0 save" in r.getMessage()]
    assert len(found) == 4
    assert "steps present: 1000; reading 1000 (the tracker's)" in found[0]
    assert "reading 1000 (the folder given)" in found[2]


def test_legacy_checkpoint_folder_given_instead_of_its_parent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fixture = DATA / "tiny_tied_fp32_tp2pp2"
    with caplog.at_level(logging.INFO, logger="ms2hf"):
        convert(fixture / "checkpoint", tmp_path / "a", quiet())
    convert(fixture, tmp_path / "b", quiet())
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    assert any("legacy rank folders" in r.getMessage() for r in caplog.records)


def test_legacy_step_by_its_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--step 1000`` names ``1000_1`` when that is the one step of epoch 1000; ``1000_1``
    still works; an ambiguous or absent epoch is refused, naming what is there."""
    root = tmp_path / "train"
    shutil.copytree(DATA / "tiny_tied_fp32_tp2pp2", root)
    code, _ = run_cli(capsys, "convert", root, tmp_path / "a", "-q", "--step", "1000")
    assert code == 0
    assert run_cli(capsys, "convert", root, tmp_path / "b", "-q", "--step", "1000_1")[0] == 0
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    code, err = run_cli(capsys, "convert", root, tmp_path / "c", "-q", "--step", "999")
    assert code == 2 and "no step of epoch 999" in err and "1000_1" in err
    for path in root.glob("checkpoint/rank_*/*-1000_1.safetensors"):
        shutil.copy(path, path.with_name(path.name.replace("-1000_1", "-1000_2")))
    code, err = run_cli(capsys, "convert", root, tmp_path / "d", "-q", "--step", "1000")
    assert code == 2 and "ambiguous" in err and "1000_1, 1000_2" in err


def test_both_formats_in_one_folder_need_a_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "train"
    shutil.copytree(DATA / "tiny_tied_fp32_tp2pp2", root)
    shutil.copytree(
        DATA_CKPT2 / "tiny_tied_fp32_tp2pp2_dedup" / "checkpoint",
        root / "checkpoint",
        dirs_exist_ok=True,
    )
    code, err = run_cli(capsys, "convert", root, tmp_path / "a", "-q")
    assert code == 2 and "holds both legacy rank_N folders and Checkpoint 2.0" in err
    assert run_cli(capsys, "convert", root, tmp_path / "b", "-q", "--step", "1000_1")[0] == 0
    iteration = root / "checkpoint" / ITERATION
    assert run_cli(capsys, "convert", iteration, tmp_path / "c", "-q")[0] == 0
    assert folder_bytes(tmp_path / "b") == folder_bytes(tmp_path / "c")


# --- which iteration --------------------------------------------------------------------------


@pytest.fixture
def two_iterations(tmp_path: Path) -> Path:
    """Iterations 500 and 1000 of one small run, with different values (seeded by the step);
    the tracker names 1000."""
    root = tmp_path / "train"
    for step in (500, 1000):
        config = GeneratorConfig(**SMALL, tp=2, save_format="ckpt2", step=step, seed=step)
        generate(config, root)
    return root


def _read_step(out: Path, root: Path, step: int) -> bool:
    """Whether ``out`` holds iteration ``step``'s weights (each iteration has its own seed)."""
    config = GeneratorConfig(**SMALL, save_format="ckpt2", step=step, seed=step)
    expected = generate(config, root.parent / f"expected-{step}").expected
    got, want = load_hf_dir(out), load_tensors(expected)
    return all(got[k].tobytes() == want[k].astype(got[k].dtype).tobytes() for k in want)


def test_the_tracker_names_the_iteration(two_iterations: Path, tmp_path: Path) -> None:
    convert(two_iterations, tmp_path / "latest", quiet(dtype="source"))
    assert _read_step(tmp_path / "latest", two_iterations, 1000)
    convert(two_iterations, tmp_path / "older", quiet(dtype="source", step="500"))
    assert _read_step(tmp_path / "older", two_iterations, 500)
    report = ms2hf.inspect(two_iterations)
    assert (report.step, report.steps_present, report.step_reason) == (
        "1000",
        ("500", "1000"),
        "the tracker's",
    )


def test_an_iteration_newer_than_the_tracker_is_never_read_silently(
    two_iterations: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (two_iterations / "checkpoint" / TRACKER).write_text("500")
    code, err = run_cli(capsys, "convert", two_iterations, tmp_path / "a", "-q")
    assert code == 2 and "Traceback" not in err
    assert "iterations [1000] are newer than the tracker's 500" in err
    assert "--step 500" in err and "--step 1000" in err
    assert not (tmp_path / "a").exists()
    named = ["--step", "1000", "--dtype", "source"]
    code, err = run_cli(capsys, "convert", two_iterations, tmp_path / "b", *named)
    assert code == 0 and "newer than the tracker's 500" in err  # read as asked, with a warning
    assert _read_step(tmp_path / "b", two_iterations, 1000)
    iteration = two_iterations / "checkpoint" / "iteration_00001000"
    code, err = run_cli(capsys, "convert", iteration, tmp_path / "c", "--dtype", "source")
    assert code == 0 and "newer than the tracker's 500" in err
    assert _read_step(tmp_path / "c", two_iterations, 1000)


def test_without_a_tracker_an_iteration_must_be_named(
    two_iterations: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (two_iterations / "checkpoint" / TRACKER).unlink()
    code, err = run_cli(capsys, "convert", two_iterations, tmp_path / "a", "-q")
    assert code == 2 and f"no {TRACKER}" in err and "present: 500, 1000" in err
    assert "--step 1000" in err
    code, err = run_cli(capsys, "convert", two_iterations, tmp_path / "b", "--step", "500")
    assert code == 0 and f"no {TRACKER} names it" in err


@pytest.mark.parametrize(
    ("tracker", "step", "expected"),
    [
        ("1500", None, "names iteration 1500, but iteration_00001500 is missing"),
        ("latest", None, "expected an iteration number"),
        ("1000", "1000_1", "whose saves are iterations (present: 500, 1000)"),
        ("1000", "700", "no folder iteration_00000700 for --step 700"),
    ],
)
def test_iteration_choices_refused(
    two_iterations: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tracker: str,
    step: str | None,
    expected: str,
) -> None:
    (two_iterations / "checkpoint" / TRACKER).write_text(tracker)
    extra = ["--step", step] if step else []
    code, err = run_cli(capsys, "convert", two_iterations, tmp_path / "a", "-q", *extra)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_a_step_that_disagrees_with_the_folder_given(
    two_iterations: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = two_iterations / "checkpoint" / "iteration_00000500"
    code, err = run_cli(capsys, "convert", folder, tmp_path / "a", "-q", "--step", "1000")
    assert code == 2 and "--step 1000 disagrees with the iteration folder given" in err


# --- optimizer files -------------------------------------------------------------------------

_OPENED: list[str] = []
_RECORDING: list[bool] = [False]


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _RECORDING[0] and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)


@pytest.fixture
def opened() -> Iterator[list[str]]:
    """Every file the process opens meanwhile (Python's audit events: open(), os.open, mmap's
    files, all of them)."""
    _OPENED.clear()
    _RECORDING[0] = True
    yield _OPENED
    _RECORDING[0] = False


def test_no_optimizer_file_is_ever_opened(opened: list[str], tmp_path: Path) -> None:
    fixture = DATA_CKPT2 / "tiny_fp32_dp2tp2pp2_opt"
    convert(fixture, tmp_path / "hf", quiet(check_replicas=True))
    ms2hf.inspect(fixture)
    assert verify(tmp_path / "hf", fixture).ok
    merge(fixture, None, tmp_path / "merged", MergeOptions(progress=False))
    assert any("-model-0000007-" in path for path in opened)  # the recording works
    assert not [path for path in opened if "-opt-" in Path(path).name]


def test_a_copy_without_optimizer_files_converts(tmp_path: Path) -> None:
    fixture = DATA_CKPT2 / "moe_fp32_dp2tp2pp2_ep2_dedup"
    copy = tmp_path / "copy"
    shutil.copytree(fixture / "checkpoint", copy / "checkpoint")
    removed = list(copy.glob("checkpoint/*/*-opt-*.safetensors"))
    assert len(removed) == 8
    for path in removed:
        path.unlink()
    convert(copy, tmp_path / "a", quiet())
    convert(fixture, tmp_path / "b", quiet())
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")


# --- replicas, whole tensors, one card --------------------------------------------------------


def _flip(path: Path, tensor: str) -> None:
    info = SafetensorsHeader(path).tensors[tensor]
    data = bytearray(path.read_bytes())
    data[info.start + 3] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("pp", [1, 2], ids=["whole tensors", "slices"])
def test_normal_saves_with_replicas(pp: int, tmp_path: Path) -> None:
    """DP2 x TP2 without optimizer sharding: every slice saved by two ranks; without pipeline
    stages each file holds whole tensors (MindSpore's integrated save). Both convert exactly;
    --check-replicas reads every copy and names a damaged one."""
    config = GeneratorConfig(**{**SMALL, "layers": 2}, tp=2, dp=2, pp=pp, save_format="ckpt2")
    generated = generate(config, tmp_path / "train")
    out = tmp_path / "hf"
    convert(generated.root, out, quiet(dtype="source", check_replicas=True))
    got, want = load_hf_dir(out), load_tensors(generated.expected)
    assert sorted(got) == sorted(want)
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    victim = generated.iteration_dir / f"qwen3-model-0000003-{config.world:07d}.safetensors"
    assert SafetensorsHeader(victim).tensors[qkv].shape == ((32, 32) if pp == 1 else (16, 32))
    _flip(victim, qkv)
    with pytest.raises(LayoutError, match=f"{qkv}.*hold different bytes"):
        convert(generated.root, tmp_path / "checked", quiet(check_replicas=True))


def test_one_card_save(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    generated = generate(GeneratorConfig(**SMALL, save_format="ckpt2"), tmp_path / "train")
    assert not (generated.iteration_dir / "metadata.json").exists()
    with caplog.at_level(logging.INFO, logger="ms2hf"):
        convert(generated.root, tmp_path / "hf", quiet(dtype="source"))
    got, want = load_hf_dir(tmp_path / "hf"), load_tensors(generated.expected)
    assert all(got[k].tobytes() == want[k].tobytes() for k in want) and sorted(got) == sorted(want)
    assert any("a one-card save" in r.getMessage() for r in caplog.records)


# --- the other commands -----------------------------------------------------------------------


def test_verify_against_either_format_of_one_run(tmp_path: Path) -> None:
    convert(DATA / "tiny_tied_fp32_tp2pp2", tmp_path / "hf", quiet())
    report = verify(tmp_path / "hf", DATA_CKPT2 / "tiny_tied_fp32_tp2pp2_dedup")
    assert report.ok, report.summary()
    assert "step 1000" in report.summary()
    _flip(tmp_path / "hf" / "model.safetensors", "model.layers.1.mlp.down_proj.weight")
    report = verify(tmp_path / "hf", DATA_CKPT2 / "tiny_tied_fp32_tp2pp2_dedup")
    differs = [p for p in report.problems if "differs from the source" in p]
    assert differs == [
        "model.safetensors: model.layers.1.mlp.down_proj.weight differs from the source (first at "
        "row 0)"
    ]


@pytest.mark.parametrize("name", ["moe_fp32_dp2tp2pp2_ep2_dedup", "tiny_fp32_dp2tp2pp2_opt"])
def test_merge_gives_the_legacy_twins_parts(name: str, tmp_path: Path) -> None:
    options = MergeOptions(progress=False, part_size=300_000)
    ours = merge(DATA_CKPT2 / name, None, tmp_path / "a", options)
    twin = DATA / CKPT2_TWINS[name]
    theirs = merge(twin / "checkpoint", twin / "strategy", tmp_path / "b", options)
    assert ours.output_dir == tmp_path / "a" / "1000_ckpt_convert" / "unified_safe"
    mine, legacy = folder_bytes(ours.output_dir), folder_bytes(theirs.output_dir)
    assert legacy.pop("hyper_param.safetensors")  # the legacy save's scalars; ckpt2 has none
    assert mine == legacy and len(mine) > 2


def test_python_api_json_config_and_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixture = DATA_CKPT2 / "tiny_fp32_dp2tp2pp2_opt_dedup"
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    report = ms2hf.convert(
        fixture,
        tmp_path / "hf",
        dtype="fp32",
        progress=False,
        reference_config=fixture / "ground_truth" / "config.json",
        tokenizer_dir=tokenizer,
    )
    assert report.to_dict()["bytes_written"] == 2_496_000
    assert report.tokenizer_files == ["tokenizer_config.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == 256  # from the reference config
    assert main(["convert", str(fixture), str(tmp_path / "cli"), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == 47
    inspected = ms2hf.inspect(fixture)
    assert inspected.source_format == "Checkpoint 2.0" and inspected.remove_redundancy is False


def test_a_bigger_save_over_many_workers_and_a_small_budget(tmp_path: Path) -> None:
    """Bands smaller than a tensor (the 4 MiB embedding and head in 1 MiB bands), two workers,
    several files: the same bytes as one worker, and the expected ones."""
    config = GeneratorConfig(
        **{**SMALL, "hidden": 128, "vocab": 16384},
        tp=2,
        dp=2,
        pp=2,
        opt_shard=-1,
        remove_redundancy=True,
        save_format="ckpt2",
        dtype="bf16",
    )
    generated = generate(config, tmp_path / "train")
    convert(generated.root, tmp_path / "a", quiet(workers=1))
    small = quiet(workers=2, memory_budget=2 << 20, max_shard_size=1_000_000)
    convert(generated.root, tmp_path / "b", small)
    assert len(list((tmp_path / "b").glob("*.safetensors"))) == 3
    a, b = load_hf_dir(tmp_path / "a"), load_hf_dir(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    want = load_tensors(generated.expected)
    assert all(a[k].tobytes() == want[k].tobytes() for k in want)  # bf16 in, bf16 out


def test_format_error_types(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="no training checkpoint here"):
        convert(tmp_path, tmp_path / "hf", quiet())


def test_an_older_mindformers_metadata_form(tmp_path: Path) -> None:
    """mindformers 1.7-1.8 wrote ``metadata.json`` indented and without ``rank_group``
    (``docs/checkpoint2.md#12-notes-where-spec-section-9-is-wrong-or-incomplete``): the same
    weights, holders taken from the records."""
    fixture = DATA_CKPT2 / "moe_fp32_dp2tp2pp2_ep2_dedup"
    copy = tmp_path / "old"
    shutil.copytree(fixture / "checkpoint", copy / "checkpoint")
    path = copy / "checkpoint" / ITERATION / "metadata.json"
    meta = json.loads(path.read_text())
    for records in meta["storage_data"].values():
        for record in records:
            del record["rank_group"]
    path.write_text(json.dumps(meta, indent=4))
    convert(copy, tmp_path / "a", quiet())
    convert(fixture, tmp_path / "b", quiet())
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    slices = {p.name: p.slices for p in ms2hf.inspect(copy).params}
    qkv = slices["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert [s.holders for s in qkv] == [(2,), (3,)]  # without rank_group: the ranks that saved
