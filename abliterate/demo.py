"""`abliterate demo`: the whole job on a tiny model built on the spot, with no downloads.

Builds a small random Llama checkpoint in several shards, makes a direction, edits the checkpoint
with the streaming editor, verifies the edit, and shows that the edited model computes exactly
what the original computes with the direction ablated by hooks.
"""

from __future__ import annotations

from pathlib import Path

import click


def run_demo(workdir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from .checkpoint import Checkpoint
    from .direction_file import load_direction, save_direction
    from .edit import apply_edit
    from .plan import EditOptions, plan_edit
    from .verify import verify

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(config).eval()
    original = workdir / "tiny-llama"
    model.save_pretrained(original, max_shard_size="400KB")
    click.echo(f"1. built a tiny Llama in {original} ({len(list(original.glob('*.safetensors')))} shards)")

    direction_file = workdir / "direction.safetensors"
    save_direction(direction_file, torch.randn(config.hidden_size), {"model": "demo", "command": "abliterate demo"})
    click.echo(f"2. wrote a direction to {direction_file}")

    ckpt = Checkpoint.open(original)
    direction = load_direction(direction_file, hidden_size=ckpt.hidden_size, num_layers=ckpt.num_layers)
    plan = plan_edit(ckpt, EditOptions())
    edited = workdir / "tiny-llama-abliterated"
    result = apply_edit(ckpt, plan, direction, edited, overwrite=True, quiet=True)
    click.echo(f"3. projected it out of {result.edited} residual-stream writers -> {edited}")

    report = verify(original, edited, direction)
    click.echo(f"4. verify: {'OK' if report.ok else report.problems} ({report.tensors_checked} tensors; largest "
               f"residual along the direction {report.max_relative_residual:.1e} |W|)")

    r = torch.from_numpy(direction.vectors)
    ids = torch.randint(0, config.vocab_size, (1, 16))
    hooks = [m.register_forward_hook(lambda _m, _i, out: out - (out @ r).unsqueeze(-1) * r)
             for name, m in model.named_modules()
             if name == "model.embed_tokens" or name.endswith(("self_attn.o_proj", ".mlp"))]
    with torch.no_grad():
        expected = model(ids).logits
        for h in hooks:
            h.remove()
        got = AutoModelForCausalLM.from_pretrained(edited).eval()(ids).logits
    click.echo(f"5. edited model vs original with the direction ablated by hooks: max |logit diff| = "
               f"{(got - expected).abs().max().item():.2e}")
