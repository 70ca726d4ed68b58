"""What load_model does to the model besides loading it: an LM head fed contiguous inputs."""

from __future__ import annotations

import torch

from abliterate.measure.loading import load_model


def test_the_lm_head_gets_a_contiguous_input_when_only_the_last_logits_are_kept(refusing_model):
    """A strided [B, 1, d] slice sends torch's CPU matmul down a path ~200x slower in bf16 (see
    loading.contiguous_head); scoring and generation keep only the last position's logits."""
    lm = load_model(refusing_model, dtype="bfloat16", device="cpu")
    seen: list[bool] = []
    head = lm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, logits_to_keep=1).logits
        full = lm.model(input_ids=ids).logits
    handle.remove()
    assert seen == [True, True]
    assert torch.equal(logits[:, -1], full[:, -1])  # the copy changes nothing computed
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_auto_dtype_keeps_the_checkpoints_16_bit_dtype_unless_the_cpu_lacks_kernels_for_it(monkeypatch):
    from transformers import LlamaConfig

    import abliterate.measure.loading as loading

    config = LlamaConfig(dtype="bfloat16")
    monkeypatch.setattr(loading, "cpu_computes", lambda dtype: True)
    assert loading.compute_dtype(config, "auto", "cpu") == torch.bfloat16
    assert loading.compute_dtype(config, "auto", "cuda") == "auto"  # the device computes it: as saved
    assert loading.compute_dtype(config, "float32", "cpu") == torch.float32  # an explicit --dtype wins
    monkeypatch.setattr(loading, "cpu_computes", lambda dtype: False)
    assert loading.compute_dtype(config, "auto", "cpu") == torch.float32
    assert loading.compute_dtype(LlamaConfig(dtype="float32"), "auto", "cpu") == "auto"
