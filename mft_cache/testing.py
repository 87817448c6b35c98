"""Tiny random causal LMs built from config, with BPE tokenizers trained on the spot, and synthetic text: what the
tests and the benchmarks run on, so that nothing downloads. Also useful for testing code built on mft-cache."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

WORDS = ("licence software copyright permission warranty liability notice redistribution source binary "
         "the a of to and in is that for with as without any distribute modify use copy merge publish grant "
         "holder contributor condition disclaimer implied fitness particular purpose damages contract tort").split()
KINDS = ("llama", "gpt2", "gemma3")


def make_texts(n: int, seed: int = 0, min_words: int = 20, max_words: int = 120) -> list[str]:
    """n sentences of random licence-like words, deterministic in seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))).capitalize() + "."
            for _ in range(n)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def make_tokenizer(folder: Path | None, bos: bool, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on make_texts; with `bos`, it adds <s> the way Llama's and Gemma's do.
    Saved to `folder` unless it is None."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(make_texts(200, seed=123), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def model_config(kind: str, vocab_size: int, hidden: int = 32, layers: int = 2, max_positions: int = 256,
                 tied: bool | None = None, **ids):
    """The config of a tiny model of `kind` (KINDS); `tied` None keeps each architecture's default
    (untied Llama, tied GPT-2 and Gemma 3)."""
    from transformers import GPT2Config, Gemma3TextConfig, LlamaConfig

    tie = {} if tied is None else {"tie_word_embeddings": tied}
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=max_positions, **{"tie_word_embeddings": False, **tie}, **ids)
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=max_positions,
                          **tie, **ids)
    if kind == "gemma3":
        return Gemma3TextConfig(vocab_size=vocab_size, hidden_size=hidden // 2, intermediate_size=hidden,
                                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                max_position_embeddings=max_positions, sliding_window=64, **tie, **ids)
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


def build_model(kind: str, vocab_size: int, seed: int = 0, **config):
    """A tiny random model in memory, its output layer scaled so the next-token distribution is peaky enough
    for top-k to mean something."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(kind, vocab_size, **config))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def make_model(folder: Path, kind: str, vocab_size: int = 300, seed: int = 0, bos: bool | None = None,
               tokenizer_vocab: int = 300, **config) -> Path:
    """A saved tiny model with its tokenizer (BOS-adding except for GPT-2 unless `bos` says otherwise; its own
    vocabulary of `tokenizer_vocab` fits inside the model's), written under a temporary name; an existing
    complete folder is kept. `config`: model_config's keywords (hidden, layers, max_positions, tied)."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = make_tokenizer(tmp, bos=kind != "gpt2" if bos is None else bos, vocab_size=tokenizer_vocab)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    build_model(kind, vocab_size, seed, **config, **ids).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# -- chat templates of real models, verbatim, for the tests of chat rendering ---------------------------------
CHAT_TEMPLATES = {
    # HuggingFaceTB/SmolLM2-135M-Instruct (ChatML with a default system message)
    "smollm2": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
        " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    # google/gemma-3-*-it (the system message joins the first user turn; roles must alternate)
    "gemma3": (
        "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
        "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
        "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
        "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
        "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
        "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
        "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
        "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
        "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
        "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
        "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
        "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
        "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"),
    # SmolLM2's template with the assistant's content and end token inside {% generation %} markers (as SmolLM3's
    # and other recent templates do), which renders the same text
    "smollm2-generation": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}{{'<|im_start|>'"
        " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
}
CHAT_SPECIAL_TOKENS = {
    "smollm2": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "gemma3": ["<start_of_turn>", "<end_of_turn>"],
    "smollm2-generation": ["<|im_start|>", "<|im_end|>"],
}


def make_chat_tokenizer(name: str, bos: bool | None = None, vocab_size: int = 300):
    """make_tokenizer's tokenizer with CHAT_TEMPLATES[name] and that template's special tokens; it adds a BOS like
    the real model's does (Llama 3 and Gemma 3 do, SmolLM2 does not) unless `bos` says otherwise."""
    tok = make_tokenizer(None, bos=name in ("llama3", "gemma3") if bos is None else bos, vocab_size=vocab_size)
    tok.add_special_tokens({"additional_special_tokens": CHAT_SPECIAL_TOKENS[name]})
    tok.chat_template = CHAT_TEMPLATES[name]
    return tok
