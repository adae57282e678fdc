"""The output folder people publish: no file of theirs is lost, one weight set, nothing but the
model's files (as huggingface_hub's own upload filter sees it), a note for what a model
repository still lacks, and a retry after a failure that just works (issue 12, items 1-4, 8)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from ms2hf.cli import main
from ms2hf.generator import GeneratorConfig, generate
from ms2hf.pipeline.engine.output_dir import RUN_RECORD
from tests.conftest import (
    DATA,
    assert_matches_ground_truth,
    fitting_tokens,
    load_hf_dir,
    load_tensors,
)
from tests.conftest import run_cli as run
from tests.edit_checkpoint import nan_copy

TINY = DATA / "tiny_fp32"
INDEX = "model.safetensors.index.json"
TOKENIZER = {
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"model_max_length": 131072}',
    "generation_config.json": b'{"bos_token_id": 151643, "eos_token_id": [151645, 151643]}',
}


def model_folder_copy(folder: Path) -> dict[str, bytes]:
    """What a user has after copying the original model's folder to put the new weights in:
    tokenizer and generation files, its config.json, a model card, and its own weights."""
    folder.mkdir(parents=True)
    config = fitting_tokens("qwen3_config.json", folder.parent / "config.json").read_bytes()
    files = {**TOKENIZER, "config.json": config, "README.md": b"# my model\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    shutil.copy(DATA / "tiny_tied_fp32_tp2pp2" / "ground_truth" / "hf_model.safetensors", folder)
    (folder / "hf_model.safetensors").rename(folder / "model.safetensors")
    return files


def uploaded(folder: Path) -> set[str]:
    """What ``huggingface_hub.upload_folder(folder_path=folder)`` would upload with its default
    settings: every file under the folder, filtered by huggingface_hub's own filter with its
    default ignore patterns (as ``HfApi._prepare_upload_folder_additions`` lists them)."""
    files = [p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file()]
    return set(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


# --- 1. no lost files ------------------------------------------------------------------------


def test_tokenizer_dir_naming_the_output_folder_keeps_every_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mymodel"
    files = model_folder_copy(out)
    reference = out / "config.json"
    argv = ["convert", TINY, out, "--tokenizer-dir", out, "--reference-config", reference]
    code, err = run(capsys, *argv, "--overwrite")
    assert code == 0, err
    for name in (*TOKENIZER, "README.md"):
        assert (out / name).read_bytes() == files[name], name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["max_position_embeddings"] == 40960
    assert "kept in place: tokenizer.json, tokenizer_config.json, generation_config.json" in err
    assert_matches_ground_truth(out, TINY, "bf16")


@pytest.mark.parametrize("reference", [True, False])
def test_a_failed_run_loses_no_file_it_reads_or_copies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: bool
) -> None:
    """Whether config.json is the run's reference config or a file the run would replace, it
    stays until a new one is written."""
    out = tmp_path / "mymodel"
    files = model_folder_copy(out)
    source = nan_copy(tmp_path / "train")  # one NaN: --strict fails after claiming the folder
    argv = ["convert", source, out, "--tokenizer-dir", out, "--overwrite", "--strict"]
    if reference:
        argv += ["--reference-config", out / "config.json"]
    code, err = run(capsys, *argv)
    assert code == 2 and "--strict refuses non-finite weights" in err
    for name, data in files.items():  # the tokenizer, the reference config, the model card
        assert (out / name).read_bytes() == data, name
    assert not (out / INDEX).exists()


# --- 2. one weight set -----------------------------------------------------------------------


def test_overwrite_removes_the_weight_set_ms2hf_names_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mymodel"
    model_folder_copy(out)  # holds model.safetensors: the tied model's weights
    code, err = run(capsys, "convert", TINY, out, "--max-shard-size", "1MB", "--overwrite")
    assert code == 0, err
    assert "model.safetensors" in err and "removed from" in err
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 2 and all(re.match(r"model-\d{5}-of-00002", n) for n in shards)
    assert_matches_ground_truth(out, TINY, "bf16")  # every tensor a loader finds is the new one


@pytest.mark.parametrize(
    "other", ["pytorch_model.bin", "consolidated.safetensors", "pytorch_model.bin.index.json"]
)
def test_another_weight_set_is_refused_and_nothing_is_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], other: str
) -> None:
    out = tmp_path / "mymodel"
    model_folder_copy(out)
    (out / other).write_bytes(b"weights a loader would also find")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = run(capsys, "convert", TINY, out, "--overwrite")
    assert code == 2 and other in err and "another weight set" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --- 3. a publishable folder -----------------------------------------------------------------


def test_after_a_failed_run_and_its_retry_upload_takes_only_the_model_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = nan_copy(tmp_path / "train")
    out = tmp_path / "hf"
    tokenizer = tmp_path / "original"
    tokenizer.mkdir()
    for name, data in TOKENIZER.items():
        (tokenizer / name).write_bytes(data)
    one_per_file = ["--max-shard-size", "1", "--tokenizer-dir", tokenizer]
    code, err = run(capsys, "convert", source, out, *one_per_file, "--strict", "--workers", "1")
    assert code == 2 and (out / RUN_RECORD).exists()  # failed midway: an unfinished folder
    (out / ".model-00009-of-00011.safetensors.ms2hf-partial").write_bytes(b"a killed run's")
    code, err = run(capsys, "convert", source, out, *one_per_file)  # the retry, without --strict
    assert code == 0, err
    shards = {p.name for p in out.glob("model-*.safetensors")}
    assert len(shards) == 47
    assert uploaded(out) == {*shards, INDEX, "config.json", *TOKENIZER}
    assert sorted(p.name for p in out.iterdir()) == sorted(uploaded(out))  # nothing hidden
    code, err = run(capsys, "verify", out)
    assert code == 0


def test_verify_checks_the_digests_a_finished_run_left_in_the_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    assert run(capsys, "convert", TINY, out, "-q", "--max-shard-size", "1MB")[0] == 0
    index = json.loads((out / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert sorted(index["metadata"]["ms2hf"]["digests"]) == shards and len(shards) == 2
    assert main(["verify", str(out)]) == 0
    assert f"digests in {INDEX}" in capsys.readouterr().out
    shard = out / shards[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert f"{shard.name}: bytes differ from what ms2hf wrote ({INDEX})" in text


# --- 4. what a model repository still lacks --------------------------------------------------


def test_notes_name_what_the_folder_lacks_and_the_summary_lists_the_copies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(capsys, "convert", TINY, tmp_path / "bare")
    assert code == 0
    assert "has no tokenizer" in err and "has no generation_config.json" in err
    assert err.count("--tokenizer-dir") == 2
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer / name).write_bytes(TOKENIZER[name])
    code, err = run(capsys, "convert", TINY, tmp_path / "hf", "--tokenizer-dir", tokenizer)
    assert code == 0
    assert "copied tokenizer.json, tokenizer_config.json" in err
    assert "has no tokenizer" not in err and "has no generation_config.json" in err
    code, err = run(capsys, "convert", TINY, tmp_path / "quiet", "-q")
    assert code == 0 and err == ""


# --- 8. retries and interruptions ------------------------------------------------------------


def test_a_retry_after_a_failed_run_is_not_another_runs_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = nan_copy(tmp_path / "train"), tmp_path / "hf"
    code, err = run(capsys, "convert", source, out, "--dtype", "fp16", "--strict")
    assert code == 2 and "--strict" in err
    code, err = run(capsys, "convert", source, out, "--dtype", "bf16")  # options changed
    assert code == 0, err
    assert "unfinished output of an earlier run" in err
    assert load_hf_dir(out)["model.embed_tokens.weight"].dtype.name == "bfloat16"


def test_an_interrupted_run_says_rerunning_resumes(tmp_path: Path) -> None:
    """A model of 32 layers written one tensor per file (about 350 files, each made durable
    before the next): stopped as soon as its first file is there, interrupted, then let go, so
    the interrupt always lands long before the last file, however busy the machine."""
    run32 = generate(
        GeneratorConfig(layers=32, hidden=64, heads=4, groups=2, head_dim=16, ffn=64, vocab=256),
        tmp_path / "train",
    )
    out = tmp_path / "hf"
    argv = [sys.executable, "-m", "ms2hf.cli", "convert", str(run32.root), str(out), "-q"]
    argv += ["--max-shard-size", "1", "--workers", "1", "--dtype", "source"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(out.glob("model-*.safetensors")):
        time.sleep(0.001)
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, f"exit status {proc.returncode}: {err}"
    assert "interrupted; no partial file was left behind" in err
    assert "file(s) finished and kept" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    rerun = subprocess.run(argv, check=False, stderr=subprocess.PIPE, text=True)
    assert rerun.returncode == 0, f"rerun: exit status {rerun.returncode}: {rerun.stderr}"
    got, want = load_hf_dir(out), load_tensors(run32.expected)
    assert sorted(got) == sorted(want)
    assert all(got[name].tobytes() == want[name].tobytes() for name in want)
