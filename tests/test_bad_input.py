"""Broken inputs get one line naming the file and the fix, a non-zero exit, no traceback, and no
output folder that looks complete; a killed run leaves nothing that looks like a model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from abliterate.io.direction_file import save_direction
from tests.families import FAMILIES, build_model, save_sharded
from tests.test_apply import run_cli


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    save_sharded(build_model(FAMILIES["llama"]), root / "model")
    save_direction(root / "dir.safetensors", torch.randn(32), {"model": "tiny"})
    return root


@pytest.fixture
def model(pristine, tmp_path) -> Path:
    shutil.copytree(pristine / "model", tmp_path / "model")
    shutil.copy(pristine / "dir.safetensors", tmp_path / "dir.safetensors")
    return tmp_path / "model"


def apply_fails(model: Path, *extra: str, direction: Path | None = None) -> str:
    out = model.parent / "out"
    code, output = run_cli("apply", str(model), "--direction", str(direction or model.parent / "dir.safetensors"),
                           "--out", str(out), "-q", *extra)
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    assert not out.exists()
    assert not [p for p in model.parent.iterdir() if "abliterate-tmp" in p.name], "temporary folder left behind"
    return lines[0]


def shards(model: Path) -> list[Path]:
    return sorted(model.glob("model-*.safetensors"))


def test_missing_shard_named_in_the_index(model):
    shards(model)[1].unlink()
    line = apply_fails(model)
    assert shards(model)[0].name not in line and "missing" in line and "re-download" in line


def test_truncated_shard(model):
    path = shards(model)[0]
    path.write_bytes(path.read_bytes()[:-100])
    line = apply_fails(model)
    assert path.name in line and "truncated" in line


def test_header_length_larger_than_the_file(model):
    path = shards(model)[0]
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    line = apply_fails(model)
    assert path.name in line and "header" in line


def test_corrupt_header_json(model):
    path = shards(model)[0]
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"!!!!"
    path.write_bytes(bytes(raw))
    assert "not JSON" in apply_fails(model)


def test_index_entry_pointing_outside_the_folder(model):
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    line = apply_fails(model)
    assert "outside the folder" in line and "model.safetensors.index.json" in line


def test_pickle_checkpoint_is_refused_without_loading_it(model):
    for p in model.glob("*.safetensors*"):
        p.unlink()
    (model / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    line = apply_fails(model)
    assert "pytorch_model.bin" in line and "pickle" in line and "safetensors" in line


def test_float8_target_tensor_is_refused(model):
    path = shards(model)[0]
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    target = next(k for k in tensors if k.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight")))
    tensors[target] = tensors[target].to(torch.float8_e4m3fn)
    save_file(tensors, path, metadata={"format": "pt"})
    line = apply_fails(model)
    assert target in line and "F8_E4M3" in line


def test_direction_with_another_hidden_size(model):
    save_direction(model.parent / "wrong.safetensors", torch.randn(48), {"model": "other/model"})
    line = apply_fails(model, direction=model.parent / "wrong.safetensors")
    assert "48" in line and "32" in line and "other/model" in line


def test_direction_file_without_direction_tensor(model):
    save_file({"something": torch.randn(32)}, model.parent / "nodir.safetensors")
    assert "no tensor named 'direction'" in apply_fails(model, direction=model.parent / "nodir.safetensors")


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_a_scale_that_is_not_a_number_is_refused_instead_of_writing_nan_weights(model, scale):
    assert f"--scale {float(scale)} is not a finite number" in apply_fails(model, f"--scale={scale}")


@pytest.mark.parametrize("layers, message", [("40:", "--layers 40: selects no layer of this model"),
                                             ("3:3", "selects no layer (END is excluded)")])
def test_a_layer_range_that_selects_no_layer_is_refused_instead_of_editing_only_the_embedding(model, layers,
                                                                                            message):
    out = model.parent / "out"
    code, output = run_cli("apply", str(model), "--direction", str(model.parent / "dir.safetensors"), "--out",
                           str(out), "-q", "--layers", layers)
    assert code == 2 and message in output and not out.exists(), output


def test_unknown_architecture_names_the_way_out(model):
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "brand_new_arch"
    (model / "config.json").write_text(json.dumps(config))
    line = apply_fails(model)
    assert "brand_new_arch" in line and "--targets" in line


def test_existing_output_is_refused_unless_overwrite(model):
    out = model.parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = run_cli("apply", str(model), "--direction", str(model.parent / "dir.safetensors"),
                           "--out", str(out), "-q")
    assert code == 2 and "--overwrite" in output and (out / "keep.txt").exists()
    code, output = run_cli("apply", str(model), "--direction", str(model.parent / "dir.safetensors"),
                           "--out", str(out), "-q", "--overwrite")
    assert code == 0, output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_verify_catches_tampered_tensors(model):
    out = model.parent / "out"
    code, output = run_cli("apply", str(model), "--direction", str(model.parent / "dir.safetensors"),
                           "--out", str(out), "-q")
    assert code == 0, output
    assert run_cli("verify", str(model), str(out))[0] == 0
    for shard in shards(out):  # flip one byte in the middle of the data of every shard
        raw = bytearray(shard.read_bytes())
        raw[len(raw) - 5] ^= 0x40
        shard.write_bytes(bytes(raw))
    code, output = run_cli("verify", str(model), str(out))
    assert code == 1
    assert "FAIL" in output


def test_verify_catches_an_edited_tensor_that_was_swapped_for_the_original(model):
    out = model.parent / "out"
    assert run_cli("apply", str(model), "--direction", str(model.parent / "dir.safetensors"), "--out", str(out),
                   "-q")[0] == 0
    for src in shards(model):  # put the unedited shards back: every edited tensor now "keeps" the direction
        shutil.copy(src, out / src.name)
    code, output = run_cli("verify", str(model), str(out))
    assert code == 1 and "differs from the recomputed projection" in output


def big_checkpoint(root: Path, layers: int, vocab: int, d: int = 1024) -> tuple[Path, Path]:
    """A checkpoint large enough (100+ MB) that an edit is still running when the test signals it."""
    big = root / "big"
    big.mkdir()
    config = {"model_type": "llama", "hidden_size": d, "num_hidden_layers": layers, "tie_word_embeddings": False}
    (big / "config.json").write_text(json.dumps(config))
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, d)}
    for i in range(layers):
        tensors[f"model.layers.{i}.self_attn.o_proj.weight"] = torch.randn(d, d)
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(d, 4 * d)
    save_file(tensors, big / "model.safetensors")
    save_direction(root / "d.safetensors", torch.randn(d), {})
    return big, root / "d.safetensors"


def start_apply_and_wait_for_output(big: Path, direction: Path, out: Path, **popen) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "abliterate", "apply", str(big), "--direction", str(direction),
                             "--out", str(out), "--max-memory", "1MB", "-q"], **popen)
    deadline = time.time() + 60
    while not list(out.parent.glob(f".{out.name}.abliterate-tmp-*/model.safetensors")) and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the edit finished before it could be interrupted"
    return proc


def test_killed_run_leaves_no_output_folder(tmp_path):
    big, direction = big_checkpoint(tmp_path, layers=4, vocab=8192)
    out = tmp_path / "out"
    proc = start_apply_and_wait_for_output(big, direction, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave a folder named like the output"
    # a second run is not confused by the leftover temporary folder
    assert run_cli("apply", str(big), "--direction", str(direction), "--out", str(out), "-q")[0] == 0
    assert (out / "model.safetensors").stat().st_size == (big / "model.safetensors").stat().st_size


def test_sigterm_cleans_up_the_temporary_folder(tmp_path):
    big, direction = big_checkpoint(tmp_path, layers=2, vocab=16384)
    out = tmp_path / "out"
    proc = start_apply_and_wait_for_output(big, direction, out, stderr=subprocess.PIPE, text=True)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.abliterate-tmp-*"))


def test_verify_of_a_folder_without_a_direction_asks_for_one(model):
    other = model.parent / "other"
    shutil.copytree(model, other)
    code, output = run_cli("verify", str(model), str(other))
    assert code == 2 and "holds no refusal_direction.safetensors" in output and "--direction" in output
