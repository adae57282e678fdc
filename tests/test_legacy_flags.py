"""The documented old commands run with only the program name changed; every spelling the old
tools accept works; every flag that disagrees with the weights fails naming itself."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from ms2hf.cli import main
from ms2hf.commands.convert import ConvertOptions, convert
from ms2hf.generator import GeneratorConfig, generate
from tests.conftest import DATA, MOE_FIXTURES, folder_bytes, load_hf_dir, load_tensors
from tests.conftest import run_cli as run
from tests.test_merge import load_unified, ms_params, training_params
from tests.test_reverse import assert_same_tensors

TINY = DATA / "tiny_fp32"
MOE = DATA / MOE_FIXTURES[0]
# tiny_fp32's true sizes, as convert_weight.py flags
TINY_FLAGS = {
    "num_layers": "4",
    "num_attention_heads": "4",
    "num_query_groups": "2",
    "kv_channels": "32",
    "ffn_hidden_size": "192",
}


def merge_argv(fixture: Path, out: Path, *extra: str, equals: bool = False) -> list[str]:
    """The command of the MindSpore Transformers docs, paths replaced."""
    flags = {
        "--src_strategy_dirs": str(fixture / "strategy"),
        "--mindspore_ckpt_dir": str(fixture / "checkpoint"),
        "--output_dir": str(out),
        "--file_suffix": "1000_1",
        "--filter_out_param_prefix": "adam_",
    }
    pairs = [[f"{k}={v}"] if equals else [k, v] for k, v in flags.items()]
    return ["merge", *(a for p in pairs for a in p), *extra]


def reverse_argv(
    unified: Path,
    out: Path,
    flags: dict[str, str],
    *extra: str,
    model: str = "qwen3",
    equals: bool = False,
) -> list[str]:
    """The command of the Qwen3 reverse docs, paths replaced, sizes as given."""
    pairs = {
        "--input_path": str(unified),
        "--output_path": str(out),
        "--model": model,
        **{f"--{k}": v for k, v in flags.items()},
        "--dtype": "bf16",
        "--max_worker": "16",
    }
    args = [a for k, v in pairs.items() for a in ([f"{k}={v}"] if equals else [k, v])]
    return ["reverse", *args, *extra]


@pytest.fixture(scope="module")
def unified(unified_of: Callable[[Path], Path]) -> Path:
    return unified_of(TINY)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("converted")
    convert(TINY, out / "hf", ConvertOptions(progress=False))
    return folder_bytes(out / "hf")


@pytest.mark.parametrize("equals", [False, True], ids=["flag value", "flag=value"])
def test_documented_merge_command(
    equals: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixture = DATA / "tiny_bf16_dedup"
    argv = merge_argv(fixture, tmp_path, "--has_redundancy", "False", equals=equals)
    code, err = run(capsys, *argv)
    assert code == 0, err
    out = tmp_path / "1000_1_ckpt_convert" / "unified_safe"
    got = load_unified(out)
    for key, array in training_params(fixture).items():
        assert got[key].tobytes() == array.tobytes(), key
    assert "warning" not in err  # False agrees with this de-duplicated save


@pytest.mark.parametrize("spelling", ["True", "False", "true", "false"])
def test_booleans_in_every_spelling(
    spelling: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(capsys, *merge_argv(TINY, tmp_path, f"--has_redundancy={spelling}"))
    assert code == 0, err
    assert ("disagrees" in err) == (spelling.lower() == "false")  # tiny_fp32 keeps redundancy


def test_a_non_boolean_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(merge_argv(TINY, tmp_path, "--has_redundancy", "yes"))
    assert e.value.code == 2
    assert "'yes' is not a boolean" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "note"),
    [
        (["--format", "safetensors"], "--format safetensors changes nothing"),
        (["--max_process_num=100000"], "--max_process_num 100000: using"),
        ([], "--filter_out_param_prefix 'adam_' matches no model parameter"),
    ],
)
def test_merge_notes_for_old_flags(
    extra: list[str], note: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(capsys, *merge_argv(TINY, tmp_path, *extra))
    assert code == 0, err
    assert f"note: {note}" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "ckpt"], "--format ckpt: ms2hf reads safetensors checkpoints only"),
        (["--max_process_num", "0"], "--max_process_num 0: expected a positive number"),
        (["--max_process_num", "4", "--workers", "2"], "give --workers or --max_process_num"),
    ],
)
def test_merge_flags_that_cannot_be_honoured(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(capsys, *merge_argv(TINY, tmp_path, *extra))
    assert code == 2 and message in err
    assert not (tmp_path / "1000_1_ckpt_convert").exists()


@pytest.mark.parametrize("equals", [False, True], ids=["flag value", "flag=value"])
@pytest.mark.parametrize(
    "reversed_", [["--reversed"], ["--reversed", "True"], ["--reversed=true"], []]
)
def test_documented_reverse_command(
    equals: bool,
    reversed_: list[str],
    unified: Path,
    converted: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, err = run(
        capsys, *reverse_argv(unified, tmp_path / "hf", TINY_FLAGS, *reversed_, equals=equals)
    )
    assert code == 0, err
    assert folder_bytes(tmp_path / "hf") == converted
    assert ("note: --reversed changes nothing" in err) == bool(reversed_)


def test_reversed_false_is_refused(
    unified: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(capsys, *reverse_argv(unified, tmp_path / "hf", {}, "--reversed", "False"))
    assert code == 2 and "--reversed False asks for Hugging Face -> MindSpore" in err


def test_max_worker_is_capped_at_the_cpu_count(
    unified: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = reverse_argv(unified, tmp_path / "hf", {}) + ["--max_worker", "100000"]
    code, err = run(capsys, *argv)
    assert code == 0 and "note: --max_worker 100000: using" in err


def test_per_layer_layout_from_the_command_line(
    unified: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(capsys, *reverse_argv(unified, tmp_path / "hf", {}, "--layout", "per-layer"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors")) == [
        f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)
    ]


@pytest.mark.parametrize(
    ("source", "flag", "value", "actual", "tensor"),
    [
        (TINY, "num_layers", "28", "4", "decoder.layers.<i>"),
        (TINY, "num_attention_heads", "16", "4", "linear_proj"),
        (TINY, "num_query_groups", "8", "2", "linear_qkv"),
        (TINY, "kv_channels", "128", "32", "q_layernorm"),
        (TINY, "ffn_hidden_size", "3072", "192", "linear_fc1"),
        (TINY, "hidden_size", "4096", "128", "embedding.word_embeddings.weight"),
        (TINY, "num_routed_experts", "8", "dense", "mlp.experts"),
        (TINY, "moe_ffn_hidden_size", "32", "dense", "mlp.experts"),
        (MOE, "num_routed_experts", "128", "8", "router"),
        (MOE, "moe_ffn_hidden_size", "768", "32", "weight2"),
        (MOE, "hidden_size", "2048", "64", "embedding.word_embeddings.weight"),
    ],
)
def test_a_disagreeing_flag_names_itself_the_tensor_and_both_values(
    source: Path,
    flag: str,
    value: str,
    actual: str,
    tensor: str,
    unified_of: Callable[[Path], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = "qwen3-moe" if source == MOE else "qwen3"
    argv = reverse_argv(unified_of(source), tmp_path / "hf", {flag: value}, model=model)
    code, err = run(capsys, *argv)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert f"--{flag} = {value}" in line and actual in line and tensor in line, line
    assert not (tmp_path / "hf").exists()


def test_moe_flags_that_agree(
    unified_of: Callable[[Path], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = {
        "num_routed_experts": "8",
        "moe_ffn_hidden_size": "32",
        "hidden_size": "64",
        "num_layers": "4",
        "num_attention_heads": "4",
        "num_query_groups": "2",
        "kv_channels": "16",
    }
    code, err = run(
        capsys, *reverse_argv(unified_of(MOE), tmp_path / "hf", flags, model="qwen3-moe")
    )
    assert code == 0, err
    convert(MOE, tmp_path / "c", ConvertOptions(progress=False))
    assert folder_bytes(tmp_path / "hf") == folder_bytes(tmp_path / "c")


def write_yaml(path: Path, **model_config: object) -> Path:
    lines = ["model:", "  model_config:"] + [f"    {k}: {v}" for k, v in model_config.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def command(name: str, tmp_path: Path, unified: Path) -> list[str | Path]:
    if name == "convert":
        return ["convert", TINY, tmp_path / "out"]
    if name == "merge":
        return merge_argv(TINY, tmp_path / "out")
    return reverse_argv(unified, tmp_path / "out", {})


@pytest.mark.parametrize("name", ["convert", "merge", "reverse"])
def test_config_sizes_under_their_aliases_are_checked(
    name: str, unified: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_yaml(
        tmp_path / "good.yaml",
        num_layers=4,
        num_query_groups=2,
        kv_channels=32,
        ffn_hidden_size=192,
        hidden_size=128,
        num_heads=4,
        tie_word_embeddings="False",
    )
    code, err = run(capsys, *command(name, tmp_path / "a", unified), "--config", good)
    assert code == 0, err
    bad = write_yaml(tmp_path / "bad.yaml", num_layers=4, num_query_groups=8)
    code, err = run(capsys, *command(name, tmp_path / "b", unified), "--config", bad)
    assert code == 2
    assert "bad.yaml: model.model_config.num_query_groups = 8" in err and "= 2" in err
    assert "linear_qkv" in err


@pytest.mark.parametrize("name", ["convert", "merge", "reverse"])
def test_config_tie_word_embeddings_is_checked(
    name: str, unified: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tied = write_yaml(tmp_path / "tied.yaml", tie_word_embeddings="True")
    code, err = run(capsys, *command(name, tmp_path, unified), "--config", tied)
    assert code == 2 and "tie_word_embeddings = True" in err and "output_layer.weight" in err


@pytest.mark.parametrize(
    ("contiguous", "interleaved"),
    [(True, True), (False, False), (True, False)],
    ids=["contiguous-qkv", "halves-fc1", "both"],
)
def test_non_default_layouts_are_honoured_from_the_yaml(
    contiguous: bool, interleaved: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = GeneratorConfig(
        contiguous_qkv=contiguous,
        interleaved_fc1=interleaved,
        tp=2,
        pp=2,
        dtype="bf16",
        remove_redundancy=True,
    )
    g = generate(config, tmp_path / "run")
    expected = load_tensors(g.expected)

    # merge keeps the fused weights in the trained layout, which ``docs/qwen3.md`` spells out
    code, err = run(capsys, *merge_argv(g.root, tmp_path / "m"), "--config", g.train_yaml)
    assert code == 0, err
    unified = tmp_path / "m" / "1000_1_ckpt_convert" / "unified_safe"
    want = ms_params(expected, json.loads(g.hf_config.read_text()), contiguous, interleaved)
    got = load_unified(unified)
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert got[name].tobytes() == array.tobytes(), name

    # convert and reverse both split them by the yaml's flags, into the same files
    for argv in (["convert", g.root, tmp_path / "c"], reverse_argv(unified, tmp_path / "r", {})):
        code, err = run(capsys, *argv, "--config", g.train_yaml, "--dtype", "source")
        assert code == 0, err
    assert folder_bytes(tmp_path / "c") == folder_bytes(tmp_path / "r")
    assert_same_tensors(load_hf_dir(tmp_path / "r"), expected)

    # without the yaml the default layout is assumed, and the split comes out wrong
    code, err = run(capsys, *reverse_argv(unified, tmp_path / "default", {}), "--dtype", "source")
    assert code == 0, err
    default = load_hf_dir(tmp_path / "default")
    wrong = "self_attn.q_proj.weight" if contiguous else "mlp.gate_proj.weight"
    assert (
        default[f"model.layers.0.{wrong}"].tobytes()
        != expected[f"model.layers.0.{wrong}"].tobytes()
    )
