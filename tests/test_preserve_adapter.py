"""The norm-preserving adapter (`apply --norm-preserve --adapter`): peft DoRA magnitudes on the modules that produce
each writer's input features, exact where the family file says a module can carry D (logits of the loaded
PeftModel against the norm-preserving weights within docs/adapters.md's 1e-5 in float32),
one clear refusal elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from abliterate.arch.family_file import parse_family
from abliterate.errors import AbliterateError
from abliterate.io.direction_file import save_direction
from tests.families import COMMON, GPT2_LIKE, IDS, LLAMA_LIKE, Family, build_model, save_sharded, written_direction
from tests.test_apply import run_cli
from tests.test_norm_preserve import PRESERVE_FLOOR, PRESERVE_TOLERANCE
from tests.test_pipeline import job_args, prompt_files  # noqa: F401  (fixture)

MHA = dict(num_key_value_heads=4)  # every head its own values: o_proj's inputs are v_proj's rows
NEOX = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)

# (family, components): gated MLPs (separate, fused gate_up), values (separate v_proj with a bias, fused qkv_proj),
# a block-output norm, a ReLU^2 MLP (scaled by sqrt(D)), a ReLU MLP with biases, attention of a MoE family,
# modules transformers renames on loading
QUALIFYING = {
    "llama": (Family("llama", dict(COMMON, **MHA)), "attn,mlp"),
    "phi3": (Family("phi3", dict(COMMON, **MHA, pad_token_id=0)), "attn,mlp"),
    "qwen2": (Family("qwen2", dict(COMMON, **MHA)), "attn,mlp"),
    "gemma2": (Family("gemma2", dict(COMMON, **MHA, head_dim=8)), "attn,mlp"),
    "arcee": (Family("arcee", dict(LLAMA_LIKE, **MHA)), "attn,mlp"),
    "gpt_neox": (Family("gpt_neox", dict(NEOX, hidden_act="relu")), "mlp"),
    "mixtral": (Family("mixtral", dict(COMMON, **MHA, num_local_experts=3, num_experts_per_tok=2)), "attn"),
    "exaone": (Family("exaone", dict(LLAMA_LIKE, **MHA)), "attn,mlp"),  # renamed on loading: peft gets memory names
}


def _edit(tmp_path, family: Family, components: str | None, *extra: str):
    """(model, original folder, direction file, args) with the model saved in several shards."""
    model = build_model(family)
    original = save_sharded(model, tmp_path / "original")
    direction = tmp_path / "dir.safetensors"
    save_direction(direction, written_direction(model), {"model": "tiny"})
    args = ["--direction", str(direction), "--norm-preserve", "-q", "--max-memory", "4KB", *extra]
    if components:
        args += ["--components", components]
    return model, original, args


@pytest.mark.parametrize("name", sorted(QUALIFYING))
def test_peft_loads_the_norm_preserving_adapter_and_computes_the_norm_preserving_weights(name, tmp_path):
    family, components = QUALIFYING[name]
    model, original, args = _edit(tmp_path, family, components)
    assert adapter_matches_weights(tmp_path, model, original, args)["use_dora"] is True


def adapter_matches_weights(tmp_path: Path, model: torch.nn.Module, original: Path, args: list[str]) -> dict:
    """`apply ARGS` written as weights and as an adapter: peft's logits equal the weights' (and the edit moves
    them); returns the adapter's config."""
    assert run_cli("apply", str(original), *args, "--out", str(tmp_path / "edited"))[0] == 0
    code, out = run_cli("apply", str(original), *args, "--adapter", "--out", str(tmp_path / "adapter"))
    assert code == 0, out
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        want, got, unedited = edited(IDS).logits, peft_model(IDS).logits, model(IDS).logits
    assert (got - want).abs().max().item() <= PRESERVE_TOLERANCE
    assert (want - unedited).abs().max().item() >= PRESERVE_FLOOR
    return json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())


REFUSED = {
    "embedding": (Family("llama", dict(COMMON, **MHA)), None, "peft's DoRA on an embedding scales hidden dimensions"),
    "grouped-query attention": (Family("llama", COMMON), "attn,mlp", "grouped-query attention"),
    "GELU MLP": (Family("gpt_neox", NEOX), "mlp", "not positively homogeneous"),
    "xIELU MLP": (Family("apertus", dict(LLAMA_LIKE, **MHA)), "mlp", "not positively homogeneous"),
    "MoE experts": (Family("mixtral", dict(COMMON, **MHA, num_local_experts=3, num_experts_per_tok=2)), "attn,mlp",
                    "a MoE expert"),
    "fused query_key_value": (Family("gpt_neox", dict(NEOX, hidden_act="relu")), "attn", "names no module"),
    "Conv1D": (Family("gpt2", dict(GPT2_LIKE, activation_function="relu")), "mlp", "Conv1D"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_no_adapter_carries_exactly_is_refused_in_one_line_naming_the_way_out(case, tmp_path):
    family, components, reason = REFUSED[case]
    _, original, args = _edit(tmp_path, family, components)
    code, out = run_cli("apply", str(original), *args, "--adapter", "--out", str(tmp_path / "adapter"))
    assert code != 0 and reason in out and "Traceback" not in out, out
    assert "write the weights (drop --adapter)" in out
    assert not (tmp_path / "adapter").exists()


def test_the_refusal_names_the_components_that_would_work(tmp_path):
    _, original, args = _edit(tmp_path, Family("llama", COMMON), "attn,mlp")
    out = run_cli("apply", str(original), *args, "--adapter", "--out", str(tmp_path / "a"))[1]
    assert "pass --components mlp (recipe key apply.components; leaving attn unedited)" in out


def test_merge_refuses_the_norm_preserving_adapter_and_points_to_apply(tmp_path):
    family, components = QUALIFYING["llama"]
    _, original, args = _edit(tmp_path, family, components)
    assert run_cli("apply", str(original), *args, "--adapter", "--out", str(tmp_path / "adapter"))[0] == 0
    code, out = run_cli("merge", str(original), str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    assert code != 0 and "use_dora" in out and "abliterate apply --norm-preserve" in out
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("entry,message", [
    ({"writer": "a.{layer}.o", "module": "a.{layer}.v", "via": "mirror"}, "via 'mirror'"),
    ({"writer": "a.{layer}.o", "module": "a.v", "via": "values"}, "same {layer}"),
    ({"writer": "a.{layer}.o", "module": "a.{layer}.v", "via": "gate", "part": [2, 2]}, "part is [i, n]"),
])
def test_a_wrong_input_scaler_in_a_family_file_is_one_clear_error(entry, message):
    data = {"name": "x", "model_types": ["x"], "writers": [{"tensor": "e.weight", "kind": "embedding"}],
            "hooks": {"embed": ["e"]}, "input_scalers": [entry]}
    with pytest.raises(AbliterateError, match=message.replace("[", r"\[").replace("{", r"\{")):
        parse_family(data, "f.yaml")


def test_ignore_biases_says_which_biases_kept_d_out(tmp_path):
    family, components = QUALIFYING["qwen2"]  # v_proj has a bias, which carries D with the rows
    _, original, args = _edit(tmp_path, family, components)
    code, out = run_cli("apply", str(original), *args, "--adapter", "--ignore-biases", "--out", str(tmp_path / "a"))
    assert code == 0 and "self_attn.v_proj were not scaled by D" in out.replace("\n", " "), out


def test_whole_job_writes_the_norm_preserving_adapter_and_its_card_numbers_replay_with_peft(
        refusing_model, prompt_files, tmp_path, monkeypatch):  # noqa: F811
    """The toy (gated MLP, a value head per head) as a whole job with a norm-preserving recipe and --adapter: the job
    evaluates with the preserving hooks on its loaded model, and the card's `evaluate --adapter OUTPUT` command,
    which loads the DoRA adapter with peft, prints the card's numbers."""
    import re
    import shlex

    recipe = tmp_path / "np.yaml"
    recipe.write_text("name: np\napply:\n  norm_preserve: true\n  components: [attn, mlp]\n")
    out = tmp_path / "toy-np-adapter"
    code, output = run_cli(str(refusing_model), "--adapter", "--recipe", str(recipe), "--out", str(out),
                           *job_args(prompt_files))
    assert code == 0, output
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    card = (out / "README.md").read_text()
    assert "DoRA adapter (norm-preserving)" in card
    command = re.search(r"Measured with:\n\n```bash\n(.+?)\n```", card).group(1)
    replay = tmp_path / "replay"  # the card names local files by their names only: put them there
    replay.mkdir()
    for path in (refusing_model, *map(Path, prompt_files.values())):
        (replay / path.name).symlink_to(path)
    monkeypatch.chdir(replay)
    code, printed = run_cli(*[str(out) if a == "OUTPUT" else a for a in shlex.split(command)[1:]], "-q",
                            "--device", "cpu")
    assert code == 0, printed
    card_rows = dict(re.findall(r"^\| ([a-zA-Z][^|]*?) \| ([^|]*\(baseline [^|]*\)) \|$", card, re.M))
    printed_rows = {m: f"{v} (baseline {b})" for m, v, b in
                    re.findall(r"^\| ([a-zA-Z][^|]*?) \| ([^|]+?) \| ([^|]+?) \|$", printed, re.M)}
    assert card_rows and all(printed_rows[m] == v for m, v in card_rows.items()), (card_rows, printed_rows)
