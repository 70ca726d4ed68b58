"""Run abliterate's GGUF outputs in llama.cpp itself and compare the logits with transformers.

Needs llama.cpp's shared library with CFFI bindings (`pip install llama-cpp-py-sync`, a prebuilt CPU
build; its 0.11739 wheel wants glibc 2.38) and the gguf package; the test suite does not. It builds a
tiny random Llama in transformers, writes it as a GGUF llama.cpp loads (F32, and Q8_0), then prints
max |logit difference| over every position of a random sequence for:

* llama.cpp on the original GGUF vs transformers on the original (the conversion's own error);
* llama.cpp on `abliterate apply`'s edited GGUF vs transformers on the original under forward hooks
  that remove r from every edited module's output (what the edit must compute);
* llama.cpp with `abliterate steer export-gguf`'s control vector vs transformers under `steering`
  (coeff x vector after that layer, every position).

    python examples/gguf_llama_cpp.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from abliterate.arch.table import arch_for_config
from abliterate.io.direction_file import save_direction
from abliterate.measure.hooks import ablate
from abliterate.steer.steering import steering

D, HEADS, KV_HEADS, FF, VOCAB, LAYERS = 64, 4, 2, 128, 128, 3


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k (as its convert_hf_to_gguf.py writes them)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: LlamaForCausalLM, path: Path, quantised: bool) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(D)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(D // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("none")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, value in model.state_dict().items():
        w = value.numpy()
        if name not in names:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            names[name] = f"blk.{layer}.{parts[rest]}.weight"
            if rest == "self_attn.q_proj":
                w = _permute(w, HEADS)
            elif rest == "self_attn.k_proj":
                w = _permute(w, KV_HEADS)
        if quantised and w.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(names[name], gguf.quants.quantize(w, q8), raw_dtype=q8)
        else:
            writer.add_tensor(names[name], np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class LlamaCpp:
    """Logits of every position from llama.cpp's C API (through llama_cpp_py_sync's CFFI bindings)."""

    def __init__(self) -> None:
        from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

        self.ffi, self.lib = get_ffi(), get_lib()
        self.lib.llama_backend_init()

    def logits(self, path: Path, tokens: list[int], control: np.ndarray | None = None) -> np.ndarray:
        lib, ffi = self.lib, self.ffi
        model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_threads = 64, 64, 64, 1
        params.type_k = params.type_v = 0  # a float32 KV cache
        ctx = lib.llama_init_from_model(model, params)
        try:
            if control is not None:  # rows for layers 1.. as llama.cpp's common_control_vector_load lays them out
                data = ffi.new("float[]", control.reshape(-1).tolist())
                assert lib.llama_set_adapter_cvec(ctx, data, control.size, D, 1, LAYERS - 1) == 0
            batch = lib.llama_batch_init(len(tokens), 0, 1)
            batch.n_tokens = len(tokens)
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
                batch.seq_id[i][0] = 0
            assert lib.llama_decode(ctx, batch) == 0
            out = np.array([np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, i), 4 * VOCAB), np.float32)
                            for i in range(len(tokens))])
            lib.llama_batch_free(batch)
            return out
        finally:
            lib.llama_free(ctx)
            lib.llama_model_free(model)


def read_control_vector(path: Path) -> np.ndarray:
    """direction.N tensors as llama.cpp's loader stacks them: row N - 1 for layer N, zeros where absent."""
    rows = np.zeros((LAYERS - 1, D), np.float32)
    for t in gguf.GGUFReader(path).tensors:
        rows[int(t.name.split(".")[1]) - 1] += np.asarray(t.data, np.float32)
    return rows


def abliterate(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "abliterate", *args, "--quiet"] if args[0] == "apply" else
                   [sys.executable, "-m", "abliterate", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    model = tiny_llama()
    arch = arch_for_config(model.config.to_dict())
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    r = torch.randn(D, generator=torch.Generator().manual_seed(2))
    vectors = torch.randn(LAYERS + 1, D, generator=torch.Generator().manual_seed(3))
    llama = LlamaCpp()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, torch.no_grad():
        root = Path(tmp)
        save_direction(root / "direction.safetensors", r, {"model": "tiny"})
        save_direction(root / "vectors.safetensors", vectors, {"model": "tiny"})
        reference = model(tokens).logits[0].numpy()
        with ablate(model, arch, r):
            ablated = model(tokens).logits[0].numpy()
        layer, coeff = 1, 2.0
        with steering(model, arch, layer, vectors[layer + 1], coeff):
            steered = model(tokens).logits[0].numpy()
        ids = tokens[0].tolist()
        print(f"tiny random Llama (d={D}, {LAYERS} layers), 16 tokens; max |logit difference| over every position "
              f"(logits span {np.ptp(reference):.2f}):")
        for kind in ("F32", "Q8_0"):
            original, edited = root / f"{kind}.gguf", root / f"{kind}-abliterated.gguf"
            write_gguf(model, original, quantised=kind == "Q8_0")
            abliterate("apply", str(original), "--direction", str(root / "direction.safetensors"), "--out", str(edited))
            base = llama.logits(original, ids)
            print(f"  {kind}: llama.cpp original vs transformers original:             "
                  f"{np.abs(base - reference).max():.2e}")
            print(f"  {kind}: llama.cpp abliterated vs transformers original + ablation: "
                  f"{np.abs(llama.logits(edited, ids) - ablated).max():.2e}  "
                  f"(the edit moved them by {np.abs(ablated - reference).max():.2e})")
        control = root / "control.gguf"
        abliterate("steer", "export-gguf", str(root / "vectors.safetensors"), "--layers", str(layer), "--coeff",
                   str(coeff), "--out", str(control))
        steered_cpp = llama.logits(root / "F32.gguf", ids, read_control_vector(control))
        print(f"  F32: llama.cpp + control vector (layer {layer}, coeff {coeff}) vs transformers steering: "
              f"{np.abs(steered_cpp - steered).max():.2e}  (steering moved them by "
              f"{np.abs(steered - reference).max():.2e})")


if __name__ == "__main__":
    main()
