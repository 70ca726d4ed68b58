"""Post-instruction positions are exactly the tokens real chat templates put after the user's message."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from abliterate.errors import AbliterateError
from abliterate.measure.templates import count_suffix_tokens, load_template, post_instruction_suffix, render

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | "
    "trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
QWEN3_THINKING = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- if enable_thinking is defined "
    "and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"
)
R1_THINKING = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{'<｜User｜>' + "
    "message['content']}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{'<｜Assistant｜><think>\n'}}{% endif %}"
)
SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>", "<|im_start|>",
            "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<|user|>", "<|assistant|>", "<|end|>",
            "<|system|>", "<think>", "</think>", "<｜User｜>", "<｜Assistant｜>", "<eos>", "<pad>"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on a few sentences, with the templates' special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Explain how to bake bread at home.", "assistant model user system", "Write a poem about rivers.\n\n"]
    tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.mark.parametrize("template,suffix,kwargs", [
    (LLAMA3, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", {}),
    (QWEN25, "<|im_end|>\n<|im_start|>assistant\n", {}),
    (GEMMA, "<end_of_turn>\n<start_of_turn>model\n", {}),
    (PHI3, "<|end|>\n<|assistant|>\n", {}),
    (QWEN3_THINKING, "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", {"enable_thinking": False}),
    (QWEN3_THINKING, "<|im_end|>\n<|im_start|>assistant\n", {"enable_thinking": True}),
    (R1_THINKING, "<｜Assistant｜><think>\n", {}),
], ids=["llama3", "qwen2.5", "gemma", "phi3", "qwen3-no-thinking", "qwen3-thinking", "r1-thinking"])
def test_post_instruction_tokens_are_exactly_the_template_suffix(tokenizer, template, suffix, kwargs):
    assert post_instruction_suffix(tokenizer, template, **kwargs) == suffix
    instruction = "Write a poem about rivers."
    prompt = render(tokenizer, instruction, template, **kwargs)
    assert prompt.endswith(instruction.strip() + suffix)
    n = count_suffix_tokens(tokenizer, prompt, suffix)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[-n:]) == suffix
    assert instruction.rstrip(".").split()[-1] in tokenizer.decode(ids[: len(ids) - n])


def test_a_token_straddling_message_and_suffix_is_not_post_instruction(tokenizer):
    # the message ends with "\n", which byte-level BPE may merge with the template's "\n": only whole
    # suffix tokens count
    prompt = render(tokenizer, "Write a poem about rivers.\n", PHI3)
    n = count_suffix_tokens(tokenizer, prompt, "<|end|>\n<|assistant|>\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[-n:]) == "<|end|>\n<|assistant|>\n"


def test_model_without_chat_template_gets_a_clear_error(tokenizer):
    with pytest.raises(AbliterateError, match="--template"):
        render(tokenizer, "hello")


def test_template_option_accepts_a_file_or_text(tmp_path, tokenizer):
    path = tmp_path / "t.jinja"
    path.write_text(PHI3)
    assert load_template(str(path)) == PHI3
    assert load_template(PHI3) == PHI3
    with pytest.raises(AbliterateError):
        load_template("not-a-file-and-not-a-template")
