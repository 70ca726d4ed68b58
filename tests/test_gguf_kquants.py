"""The K-quant quantisers write what llama.cpp's reference quantisers write, bit for bit, and read back
what ggml's dequantisers read.

The reference bytes (tests/data/kquant_reference.json) were made once by benchmarks/kquant_reference.py,
which compiles llama.cpp's ggml-quants.c and runs `quantize_row_qN_K_ref` on the same inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from abliterate.gguf.kquants import KQUANT_TYPES, dequantize_kquant, quantize_kquant
from abliterate.gguf.legacy_quants import LEGACY_TYPES, dequantize_legacy, quantize_legacy
from tests.gguf_models import kquant_inputs

REFERENCE = json.loads((Path(__file__).parent / "data" / "kquant_reference.json").read_text())


@pytest.mark.parametrize("type_name", KQUANT_TYPES)
def test_k_quant_bytes_equal_llama_cpp_reference_quantiser(type_name):
    x = kquant_inputs(REFERENCE["seed"], REFERENCE["blocks"])
    got = quantize_kquant(x, type_name)
    want = REFERENCE["types"][type_name]
    for i, block in enumerate(want["first"]):  # where a mismatch starts, if any
        assert bytes(got[i]).hex() == block, (type_name, i)
    assert hashlib.sha256(got.tobytes()).hexdigest() == want["sha256"], type_name


@pytest.mark.parametrize("type_name", KQUANT_TYPES)
def test_k_quant_dequantiser_equals_ggml_dequantiser(type_name):
    blocks = quantize_kquant(kquant_inputs(7, 256), type_name)
    want = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[type_name]).reshape(-1, 256)
    got = dequantize_kquant(blocks, type_name)
    assert np.array_equal(got, want)
    assert np.abs(got).max() > 0


@pytest.mark.parametrize("type_name", LEGACY_TYPES)
def test_legacy_quantiser_bytes_and_values_equal_the_gguf_librarys(type_name):
    """Q8_0 ... Q5_1 in few numpy passes write the bytes the gguf library writes (llama.cpp's reference
    formulas), exact halves included (C's roundf for Q8_0 rounds them away from zero)."""
    halves = np.random.default_rng(1).integers(-254, 255, (2048, 32)).astype(np.float32) * np.float32(0.5)
    x = np.concatenate([kquant_inputs(3, 256).reshape(-1, 32), halves])
    qtype = gguf.GGMLQuantizationType[type_name]
    got = quantize_legacy(x, type_name)
    assert np.array_equal(got, gguf.quants.quantize(x, qtype).reshape(got.shape))
    assert np.array_equal(dequantize_legacy(got, type_name), gguf.quants.dequantize(got, qtype).reshape(x.shape))
