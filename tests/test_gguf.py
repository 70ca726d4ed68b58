"""`abliterate apply` on GGUF files: float tensors get exactly the safetensors edit, quantised ones the
projection of their dequantised values within one quantisation step, and everything else the input's bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from abliterate.edit.projection import project
from abliterate.gguf.format import read_gguf
from abliterate.io.direction_file import load_direction, save_direction
from tests.families import COMMON, Family, build_model
from tests.gguf_models import gguf_tensors, raw_bytes, read_values, write_gguf
from tests.test_apply import run_cli

LLAMA = Family("llama", dict(COMMON, intermediate_size=64))  # rows of 64: whole Q8_0/Q4_0 blocks
MOE = Family("qwen2_moe", dict(COMMON, intermediate_size=64, num_experts=3, num_experts_per_tok=2,
                                moe_intermediate_size=32, shared_expert_intermediate_size=64))
D, LAYERS = 32, 2
Q8 = {r".*\.weight": "Q8_0", r".*norm.*": "F32"}


def _axis(name: str) -> int:
    return -1 if name.startswith(("token_embd", "position_embd")) or name.endswith(".bias") else -2


def _row(name: str, vectors: np.ndarray) -> np.ndarray:
    """The direction row a GGUF tensor is edited with (row 0: embeddings, L + 1: what layer L writes)."""
    if vectors.ndim == 1:
        return vectors
    return vectors[0] if not name.startswith("blk.") else vectors[int(name.split(".")[1]) + 1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny Llama and Qwen2-MoE saved as safetensors, with a direction each (per-layer for the MoE)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for family, per_layer in ((LLAMA, False), (MOE, True)):
        folder = root / family.model_type
        build_model(family).save_pretrained(folder)
        shape = (LAYERS + 1, D) if per_layer else (D,)
        direction = root / f"{family.model_type}-dir.safetensors"
        save_direction(direction, torch.randn(shape, generator=torch.Generator().manual_seed(3)), {"model": "tiny"})
        out[family.model_type] = (folder, direction, load_direction(direction).vectors)
    return root, out


def _gguf(root: Path, folder: Path, name: str, arch: str, *, tied: bool = True, types: dict | None = None) -> Path:
    tensors = gguf_tensors(folder)
    if tied:
        del tensors["output.weight"]
    return write_gguf(root / name, arch, tensors, hidden=D, layers=LAYERS, types=types)


def _apply(src: Path, direction: Path, out: Path, *extra: str) -> str:
    code, output = run_cli("apply", str(src), "--direction", str(direction), "--out", str(out), "--quiet", *extra)
    assert code == 0, output
    return output


@pytest.mark.parametrize(("family", "dtype"), [("llama", "F32"), ("qwen2_moe", "F32"), ("llama", "F16")])
def test_float_gguf_edit_equals_the_safetensors_edit(models, family, dtype):
    root, found = models
    folder, direction, _ = found[family]
    if dtype == "F16":  # the same model stored in float16, as safetensors and as GGUF
        half = root / f"{family}-f16"
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).save_pretrained(half)
        folder = half
    src = _gguf(root, folder, f"{family}-{dtype}.gguf", {"llama": "llama", "qwen2_moe": "qwen2moe"}[family],
                tied=False, types={r".*": dtype})
    assert {t.type_name for t in read_gguf(src).tensors} == {dtype}
    _apply(src, direction, root / f"{family}-{dtype}-edited.gguf")
    _apply(folder, direction, root / f"{family}-{dtype}-edited-st")
    want = gguf_tensors(root / f"{family}-{dtype}-edited-st")
    got = read_values(root / f"{family}-{dtype}-edited.gguf")
    assert set(got) == set(want)
    for name in got:
        assert np.array_equal(got[name], want[name].astype(np.float32)), name
    down = "blk.0.ffn_down_exps.weight" if family == "qwen2_moe" else "blk.0.ffn_down.weight"
    assert not np.array_equal(got[down], read_values(src)[down])


def test_q8_0_tensors_are_within_one_quantisation_step_of_the_projection(models):
    root, found = models
    folder, direction, vectors = found["qwen2_moe"]
    src = _gguf(root, folder, "moe-q8.gguf", "qwen2moe", types=Q8)
    _apply(src, direction, root / "moe-q8-edited.gguf", "--max-memory", "4KB")  # row blocks in two passes
    before, after = read_values(src), read_values(root / "moe-q8-edited.gguf")
    edited = read_gguf(root / "moe-q8-edited.gguf").by_name()
    writers = [n for n in before if n.startswith("token_embd") or "attn_output" in n or "ffn_down" in n]
    assert len(writers) == 1 + LAYERS * 3  # embedding, attention, experts, shared expert
    for name in writers:
        assert edited[name].type_name == "Q8_0"
        want = project(before[name], _row(name, vectors), _axis(name))
        blocks = want.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # Q8_0's step in each block of 32
        assert (np.abs(after[name].reshape(-1, 32) - blocks) <= step).all(), name
        assert not np.allclose(after[name], before[name]), name


def test_untouched_tensors_and_metadata_are_byte_identical(models):
    root, found = models
    folder, direction, _ = found["llama"]
    src = _gguf(root, folder, "llama-q8.gguf", "llama", types=Q8)
    out = root / "llama-q8-edited.gguf"
    _apply(src, direction, out)
    a, b = read_gguf(src), read_gguf(out)
    assert a.metadata_bytes == b.metadata_bytes and a.metadata == b.metadata
    raw_a, raw_b = raw_bytes(src), raw_bytes(out)
    edited = {n for n in raw_a if n.startswith("token_embd") or "attn_output" in n or "ffn_down" in n}
    assert len(edited) == 1 + 2 * LAYERS
    for name in raw_a:
        assert (raw_a[name] == raw_b[name]) == (name not in edited), name
    assert raw_b["output.weight"] == raw_a["token_embd.weight"]  # untied: the output layer keeps the original
    assert [t.name for t in b.tensors] == [t.name for t in a.tensors] + ["output.weight"]


def test_a_gguf_that_has_an_output_tensor_keeps_every_offset(models):
    root, found = models
    folder, direction, _ = found["llama"]
    src = _gguf(root, folder, "llama-untied.gguf", "llama", tied=False, types=Q8)
    out = root / "llama-untied-edited.gguf"
    _apply(src, direction, out)
    a, b = read_gguf(src), read_gguf(out)
    assert src.stat().st_size == out.stat().st_size
    assert [(t.name, t.start, t.nbytes, t.type_name) for t in a.tensors] == \
        [(t.name, t.start, t.nbytes, t.type_name) for t in b.tensors]
    assert src.read_bytes()[: a.data_start] == out.read_bytes()[: b.data_start]  # the whole header


def _wide_llama(root: Path, folder: Path, name: str, types: dict[str, str]) -> Path:
    """The tiny Llama with blk.0.ffn_down's rows made 256 long (tiled), so K-quant and IQ blocks fit."""
    tensors = gguf_tensors(folder)
    tensors["blk.0.ffn_down.weight"] = np.tile(tensors["blk.0.ffn_down.weight"], (1, 4))
    return write_gguf(root / name, "llama", tensors, hidden=D, layers=LAYERS, types=types)


@pytest.mark.parametrize("kquant", ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"])
def test_k_quants_are_written_back_as_the_same_k_quant(models, kquant):
    from abliterate.gguf.kquants import dequantize_kquant, kquant_steps, quantize_kquant

    root, found = models
    folder, direction, vectors = found["llama"]
    name = "blk.0.ffn_down.weight"
    src = _wide_llama(root, folder, f"{kquant}.gguf", {r"blk\.0\.ffn_down\.weight": kquant})
    out = root / f"{kquant}-edited.gguf"
    printed = _apply(src, direction, out)
    assert "re-quantised as" not in printed, printed
    assert read_gguf(out).by_name()[name].type_name == kquant
    want = project(read_values(src)[name], vectors, -2)
    got = raw_bytes(out)[name]
    # the bytes llama.cpp's reference quantiser writes for the projection (kquants matches it bit for bit)
    assert got == quantize_kquant(want, kquant).tobytes()
    blocks = np.frombuffer(got, np.uint8).reshape(want.size // 256, -1)
    steps, _ = kquant_steps(blocks, kquant)
    error = np.abs(dequantize_kquant(blocks, kquant) - want.reshape(-1, 256)).max(axis=1)
    assert (error <= steps.max(axis=1)).all()  # within the block's largest sub-block step
    assert got != raw_bytes(src)[name]
    code, printed = run_cli("verify", str(src), str(out))
    assert code == 0 and "OK" in printed, printed


@pytest.mark.parametrize(("iq", "requant", "written"), [("IQ4_XS", None, "Q4_K"), ("IQ4_NL", None, "Q4_1"),
                                                        ("IQ4_XS", "Q8_0", "Q8_0"), ("IQ4_XS", "F16", "F16")])
def test_types_that_cannot_be_written_go_to_the_nearest_or_the_chosen_type(models, iq, requant, written):
    root, found = models
    folder, direction, vectors = found["llama"]
    src = _wide_llama(root, folder, f"{iq}-{requant}.gguf", {r"blk\.0\.ffn_down\.weight": iq})
    out = root / f"{iq}-{requant}-edited.gguf"
    printed = _apply(src, direction, out, *(["--requant", requant] if requant else []))
    assert f"{iq}->{written}" in printed and "blk.0.ffn_down.weight" in printed
    name = "blk.0.ffn_down.weight"
    assert read_gguf(out).by_name()[name].type_name == written
    want = project(read_values(src)[name], vectors, -2)
    got = read_values(out)[name]
    if written == "F16":
        assert np.array_equal(got, want.astype(np.float16).astype(np.float32))
    elif written == "Q8_0":
        step = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        assert (np.abs(got.reshape(-1, 32) - want.reshape(-1, 32)) <= step).all()
    assert not np.allclose(got, read_values(src)[name])
    assert raw_bytes(out)["blk.1.ffn_up.weight"] == raw_bytes(src)["blk.1.ffn_up.weight"]  # after the resized one
    code, printed = run_cli("verify", str(src), str(out))
    assert code == 0 and "OK" in printed, printed


def _error(*args: str) -> str:
    code, output = run_cli(*args)
    assert code != 0
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
    return lines[0]


def test_bad_gguf_inputs_are_one_line_errors_and_write_nothing(models):
    root, found = models
    folder, direction, _ = found["llama"]
    src = _gguf(root, folder, "bad-base.gguf", "llama")
    out = root / "bad-out.gguf"
    truncated = root / "truncated.gguf"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size - 100])
    assert "truncated" in _error("apply", str(truncated), "--direction", str(direction), "--out", str(out))
    header_cut = root / "header-cut.gguf"
    header_cut.write_bytes(src.read_bytes()[:200])
    assert "truncated" in _error("apply", str(header_cut), "--direction", str(direction), "--out", str(out))
    unknown = write_gguf(root / "unknown.gguf", "mamba", gguf_tensors(folder), hidden=D, layers=LAYERS)
    assert "'mamba'" in _error("apply", str(unknown), "--direction", str(direction), "--out", str(out))
    other = root / "dir-64.safetensors"
    save_direction(other, torch.randn(64), {"model": "other"})
    assert "hidden size 64" in _error("apply", str(src), "--direction", str(other), "--out", str(out))
    unreadable = gguf_tensors(folder)
    unreadable["blk.0.attn_output.weight"] = np.zeros((D, D // 32 * 40), np.uint8)  # Q8_1: gguf cannot read it
    q8_1 = write_gguf(root / "q8_1.gguf", "llama", unreadable, hidden=D, layers=LAYERS,
                      types={r"blk\.0\.attn_output\.weight": "Q8_1"})
    assert "Q8_1" in _error("apply", str(q8_1), "--direction", str(direction), "--out", str(out))
    out.write_bytes(b"keep me")
    assert "already exists" in _error("apply", str(src), "--direction", str(direction), "--out", str(out))
    assert out.read_bytes() == b"keep me"
    out.unlink()
    assert not list(root.glob("*bad-out*"))


def test_families_that_always_tie_the_output_need_keep_tied(models):
    root, found = models
    folder, direction, _ = found["llama"]
    src = _gguf(root, folder, "gemma2.gguf", "gemma2")
    assert "--keep-tied" in _error("apply", str(src), "--direction", str(direction), "--out", str(root / "g.gguf"))
    printed = _apply(src, direction, root / "g.gguf", "--keep-tied")
    assert "--keep-tied" in printed
    after = read_gguf(root / "g.gguf")
    assert "output.weight" not in after.by_name()
    assert raw_bytes(root / "g.gguf")["token_embd.weight"] != raw_bytes(src)["token_embd.weight"]


def test_an_interrupted_gguf_edit_leaves_no_output(models, monkeypatch):
    import abliterate.gguf.edit as gguf_edit

    root, found = models
    folder, direction, _ = found["llama"]
    src = _gguf(root, folder, "interrupted.gguf", "llama", types=Q8)
    calls = []
    original = gguf_edit.write_edited

    def dies_on_the_third_tensor(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(gguf_edit, "write_edited", dies_on_the_third_tensor)
    (root / "killed").mkdir()
    code, _ = run_cli("apply", str(src), "--direction", str(direction), "--out", str(root / "killed" / "m.gguf"), "-q")
    assert code != 0 and len(calls) == 3
    assert list((root / "killed").iterdir()) == []


def _tamper(path: Path, tensor: str, delta: int, at: int = 0) -> Path:
    """A copy of `path` with one byte of `tensor` changed (its `at`-th byte)."""
    info = read_gguf(path).by_name()[tensor]
    data = bytearray(path.read_bytes())
    data[info.start + at] = (data[info.start + at] + delta) % 256
    out = path.with_name("tampered-" + path.name)
    out.write_bytes(bytes(data))
    manifest = path.with_name(path.name + ".abliterate.json")
    out.with_name(out.name + ".abliterate.json").write_bytes(manifest.read_bytes())
    return out


@pytest.mark.parametrize("types", [None, Q8], ids=["F32", "Q8_0"])
def test_verify_accepts_the_edit_and_rejects_a_changed_byte(models, types):
    root, found = models
    folder, direction, _ = found["qwen2_moe"]
    tag = "q8" if types else "f32"
    src = _gguf(root, folder, f"verify-{tag}.gguf", "qwen2moe", types=types)
    out = root / f"verify-{tag}-edited.gguf"
    _apply(src, direction, out, "--max-memory", "8KB")
    code, printed = run_cli("verify", str(src), str(out))
    assert code == 0 and "OK" in printed, printed
    code, printed = run_cli("verify", str(src), str(out), "--max-memory", "4KB")  # other chunks, same verdict
    assert code == 0, printed
    # the float32's high byte of the first value, or a Q8_0 block's first code (after its 2-byte scale)
    at = 3 if types is None else 2 + 5
    for tensor, delta in (("blk.1.ffn_down_exps.weight", 40), ("blk.0.ffn_up_exps.weight", 1)):
        code, printed = run_cli("verify", str(src), str(_tamper(out, tensor, delta, at)))
        assert code == 1 and f"FAIL {tensor}" in printed, printed
    code, printed = run_cli("verify", str(src), str(_tamper(out, "output.weight", 1)))
    assert code == 1 and "FAIL output.weight should be byte-identical to the original token_embd" in printed, printed


@pytest.mark.parametrize("qtype", ["Q5_0", "Q4_0", "Q8_0"])
def test_verify_step_covers_a_clamped_extreme_and_the_float16_scale(qtype):
    """Q4_0/Q5_0 map the block's largest magnitude to -8/-16 and clamp the other sign at +7/+15: a value
    there is a full step off, plus what rounding the scale to float16 adds; verify's step allows both."""
    from abliterate.gguf.format import dequantize, quantize
    from abliterate.gguf.verify import _quant_step

    rng = np.random.default_rng(0)
    blocks = rng.uniform(-1, 1, (4096, 32)).astype(np.float32) * rng.uniform(0.01, 1, (4096, 1)).astype(np.float32)
    blocks[:, 0] = -np.abs(blocks).max(axis=1) * 1.01  # the extreme, and its mirror image at the clamp
    blocks[:, 1] = -blocks[:, 0]
    got = dequantize(quantize(blocks, qtype), qtype, blocks.shape)
    error = np.abs(got - blocks)
    step = _quant_step(blocks, qtype)
    assert (error <= step).all()
    assert (error > 0.99 * step).any() == (qtype != "Q8_0")  # the clamped value is about one step off


def test_the_gguf_manifest_is_the_typed_edit_manifest_and_verify_reads_it_so(models):
    import json

    from abliterate.edit.manifest import read_manifest_file

    root, found = models
    folder, direction, _ = found["qwen2_moe"]
    src = _gguf(root, folder, "manifest-q8.gguf", "qwen2moe", types=Q8)
    out = root / "manifest-q8-edited.gguf"
    _apply(src, direction, out)
    path = out.with_name(out.name + ".abliterate.json")
    manifest = read_manifest_file(path)
    assert manifest.untie == ("output.weight", "token_embd.weight") and manifest.max_memory == 256 << 20
    edit = manifest.edits["blk.0.ffn_down_exps.weight"]
    assert (edit.type, edit.written_type, edit.component) == ("Q8_0", "Q8_0", "mlp")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "untie": True}))  # as written before the typed record: still verifies
    code, printed = run_cli("verify", str(src), str(out))
    assert code == 0 and "OK" in printed, printed
    del data["edits"]["blk.0.ffn_down_exps.weight"]["written_type"]
    path.write_text(json.dumps(data))
    code, printed = run_cli("verify", str(src), str(out))
    assert code == 2 and "edits.blk.0.ffn_down_exps.weight needs type and written_type" in printed, printed


def test_control_vector_holds_coeff_times_each_layers_vector_in_llama_cpp_numbering(tmp_path):
    vectors = np.random.default_rng(4).standard_normal((LAYERS + 2, D)).astype(np.float32)  # 3 layers + embedding
    save_direction(tmp_path / "vectors.safetensors", vectors, {"model": "org/tiny"})
    out = tmp_path / "control.gguf"
    code, printed = run_cli("steer", "export-gguf", str(tmp_path / "vectors.safetensors"), "--layers", "1:",
                            "--coeff", "-2.5", "--out", str(out))
    assert code == 0, printed
    header = read_gguf(out)
    assert header.architecture == "controlvector" and header.metadata["controlvector.model_hint"] == "org/tiny"
    assert header.metadata["controlvector.layer_count"] == 2
    values = read_values(out)
    assert sorted(values) == ["direction.1", "direction.2"]
    for layer in (1, 2):  # row L + 1 is what leaves layer L, as `steer chat --layer L` adds it
        assert np.array_equal(values[f"direction.{layer}"], vectors[layer + 1] * np.float32(-2.5))
    assert "layer 0" in _error("steer", "export-gguf", str(tmp_path / "vectors.safetensors"), "--layers", "0:2",
                               "--coeff", "1", "--out", str(tmp_path / "zero.gguf"))
    save_direction(tmp_path / "single.safetensors", vectors[0], {"model": "org/tiny"})
    assert "END" in _error("steer", "export-gguf", str(tmp_path / "single.safetensors"), "--layers", "2:",
                           "--coeff", "1", "--out", str(tmp_path / "single.gguf"))
    assert "already exists" in _error("steer", "export-gguf", str(tmp_path / "vectors.safetensors"), "--layers", "1",
                                      "--coeff", "1", "--out", str(out))
    assert not (tmp_path / "zero.gguf").exists() and not (tmp_path / "single.gguf").exists()


def test_the_header_parser_reads_what_the_gguf_library_reads(models, tmp_path):
    """gguf/header.py steps over metadata arrays instead of decoding them: the tensors (offsets, sizes, types,
    shapes), scalar metadata and data start it finds are the gguf library reader's."""
    import gguf

    _, found = models
    folder, _, _ = found["qwen2_moe"]
    tensors = gguf_tensors(folder)
    src = write_gguf(tmp_path / "arrays.gguf", "qwen2moe", tensors, hidden=D, layers=LAYERS,
                     types={r".*ffn_down_exps.*": "Q8_0", r".*ffn_up.*": "F16"}, extra={"note": "ünïcode"})
    reader = gguf.GGUFReader(src)
    want = {t.name: (int(t.data_offset), int(t.n_bytes), t.tensor_type.name,
                     tuple(int(x) for x in reversed(t.shape.tolist()))) for t in reader.tensors}
    got = read_gguf(src)
    assert {t.name: (t.start, t.nbytes, t.type_name, t.shape) for t in got.tensors} == want
    scalars = {n: f.contents() for n, f in reader.fields.items()
               if f.types and f.types[0] != gguf.GGUFValueType.ARRAY and not n.startswith("GGUF.")}
    assert got.metadata == scalars and got.metadata["note"] == "ünïcode"
    assert got.data_start == reader.data_offset and "tokenizer.ggml.tokens" in reader.fields
