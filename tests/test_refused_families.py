"""model_types abliterate refuses (abliterate/arch/refused.yaml) are refused in one line that says why, by every
command that reads the table, on a tiny checkpoint of the type built from its transformers config; the input is left
alone and nothing is written."""

from __future__ import annotations

import pytest
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from abliterate.arch.table import refused_model_types, supported_model_types
from abliterate.io.direction_file import save_direction
from tests.families import LLAMA_LIKE, MLA, Family, build_model, save_sharded
from tests.test_apply import folder_hashes, run_cli

TINY = {
    # one logical layer is two attention and two MLP sublayers plus the shortcut MoE with a zero-computation expert
    "longcat_flash": Family("longcat_flash", dict(LLAMA_LIKE, num_layers=2, ffn_hidden_size=48, moe_topk=2,
                                                  n_routed_experts=3, zero_expert_num=1, expert_ffn_hidden_size=16,
                                                  **MLA)),
    "deepseek_v4": Family("deepseek_v4", dict(LLAMA_LIKE, num_key_value_heads=1, q_lora_rank=16, n_routed_experts=3,
                                              num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                                              o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16,
                                              index_topk=8, sliding_window=8, num_nextn_predict_layers=0)),
}


def test_refused_types_are_transformers_types_the_table_does_not_list():
    assert set(refused_model_types()) == set(TINY)
    assert set(refused_model_types()) <= set(CONFIG_MAPPING_NAMES)
    assert not set(refused_model_types()) & set(supported_model_types())


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_refused_type_is_one_line_naming_why_and_writes_nothing(name, tmp_path):
    model = build_model(TINY[name])
    original = save_sharded(model, tmp_path / "original")
    save_direction(tmp_path / "dir.safetensors", [0.1] * model.config.hidden_size, {"model": "tiny"})
    before = folder_hashes(original)
    why = refused_model_types()[name]
    for args in (["apply", str(original), "--direction", str(tmp_path / "dir.safetensors"), "--out",
                  str(tmp_path / "edited")],
                 ["apply", str(original), "--direction", str(tmp_path / "dir.safetensors"), "--adapter", "--out",
                  str(tmp_path / "edited")]):
        code, out = run_cli(*args)
        assert code == 2 and out.strip() == f"error: model_type {name!r} is not supported: {why}", out
        assert not (tmp_path / "edited").exists()
    assert folder_hashes(original) == before
