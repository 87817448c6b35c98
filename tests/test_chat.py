"""Chat and instruction rows: ids exactly as transformers' apply_chat_template gives them on real templates
(SmolLM2's ChatML, Llama 3's, Gemma 3's), the trained labels of the assistant turns found two ways (generation
markers, prefix renders) and equal, TRL's prompt-completion rule, templates that cannot be split refused, bad rows
refused naming the row, and rows through the packing into label masks."""
import hashlib

import pytest

from helpers import pack_documents
from mft_cache.rows import chat
from mft_cache.rows.chat import detect_format, render, template_fingerprint, validate_row
from mft_cache.rows.documents import DocumentError
from mft_cache.rows.packing import encode_documents
from mft_cache.testing import CHAT_TEMPLATES, make_chat_tokenizer, make_tokenizer

WHERE = "--data chats.jsonl: line 7"
END = {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "gemma3": "<end_of_turn>", "smollm2-generation": "<|im_end|>"}
CONVERSATIONS = [
    [{"role": "user", "content": "the licence"}, {"role": "assistant", "content": "a copy of the software"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who may copy it?"},
     {"role": "assistant", "content": "Anyone, with the notice."}, {"role": "user", "content": "warranty?"},
     {"role": "assistant", "content": "None: it is provided as is, without warranty of any kind."}],
    [{"role": "user", "content": "  spaces around  "}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "and then?"}, {"role": "assistant", "content": "\nmerge, publish\n"}],
]


@pytest.fixture(scope="module")
def tokenizers():
    return {name: make_chat_tokenizer(name) for name in CHAT_TEMPLATES}


def transformers_ids(tok, messages, **kwargs):
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def spans(trained):
    """[start, end) of each run of True."""
    out, start = [], None
    for t, x in enumerate(list(trained) + [False]):
        if x and start is None:
            start = t
        if not x and start is not None:
            out.append((start, t))
            start = None
    return out


def expected_turn(name, content):
    # Llama 3's and Gemma 3's templates trim the content; SmolLM2's keeps it as is
    return (content if name.startswith("smollm2") else content.strip()) + END[name]


@pytest.mark.parametrize("name", list(CHAT_TEMPLATES))
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_ids_and_trained_turns(tokenizers, name, conv):
    tok, messages = tokenizers[name], CONVERSATIONS[conv]
    ids, trained = render({"messages": messages}, tok, "chat", where=WHERE)
    assert ids == transformers_ids(tok, messages)
    assert len(trained) == len(ids) and not trained[0]
    # one run of trained labels per assistant turn: exactly its content and its end token, never the header
    # ("<|im_start|>assistant\n") nor what follows the end token
    turns = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = spans(trained)
    assert [tok.decode(ids[s:e]) for s, e in runs] == [expected_turn(name, c) for c in turns]


def test_generation_markers_and_prefix_renders_agree(tokenizers, monkeypatch):
    marked, plain = tokenizers["smollm2-generation"], tokenizers["smollm2"]
    for messages in CONVERSATIONS:
        by_markers = render({"messages": messages}, marked, "chat", method="markers")
        by_turns = render({"messages": messages}, marked, "chat", method="turns")
        on_plain = render({"messages": messages}, plain, "chat")  # the same text without markers
        assert by_markers == by_turns == on_plain
    monkeypatch.setattr(chat, "_turn_mask", None)  # "auto" must take the markers' path on a marked template
    assert render({"messages": CONVERSATIONS[-1]}, marked, "chat") == on_plain  # (the last conversation)
    with pytest.raises(DocumentError, match="generation"):
        render({"messages": CONVERSATIONS[0]}, plain, "chat", method="markers")


# Templates whose renders of a conversation's prefixes do not extend each other.
DROPS_REASONING = (  # keeps the reasoning of the last assistant message only, as reasoning models' templates do
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n' + "
    "m['content'].split('</think>')[-1] + '<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + "
    "m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
THINKING_PROMPT = (  # the generation prompt opens a reasoning block the rendered turns do not have
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}")


def test_templates_whose_prefixes_do_not_extend_are_refused():
    tok = make_chat_tokenizer("smollm2")
    tok.chat_template = DROPS_REASONING
    messages = [{"role": "user", "content": "the licence"},
                {"role": "assistant", "content": "<think>which one</think>the MIT licence"},
                {"role": "user", "content": "and?"}, {"role": "assistant", "content": "that is all"}]
    with pytest.raises(DocumentError, match=r"^--data chats.jsonl: line 7: message 2: .*does not extend"):
        render({"messages": messages}, tok, "chat", where=WHERE)
    ids, trained = render({"messages": messages}, tok, "chat", "all")  # every label: no split needed
    assert ids == transformers_ids(tok, messages) and trained == [False] + [True] * (len(ids) - 1)
    tok.chat_template = THINKING_PROMPT
    with pytest.raises(DocumentError, match="message 1: .*generation prompt is not where the assistant turn starts"):
        render({"messages": messages[:2]}, tok, "chat", where=WHERE)


def test_a_template_that_refuses_the_conversation_names_the_row(tokenizers):
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"}]
    with pytest.raises(DocumentError, match=r"^--data chats.jsonl: line 7: .*chat template cannot render.*alternate"):
        render({"messages": messages}, tokenizers["gemma3"], "chat", where=WHERE)
    with pytest.raises(DocumentError, match="no chat template"):
        render({"messages": CONVERSATIONS[0]}, make_tokenizer(None, bos=False), "chat", where=WHERE)


BAD_ROWS = [
    ({"messages": []}, "chat", "empty conversation"),
    ({"messages": "hello"}, "chat", "holds str, expected a list of messages"),
    ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}, "chat",
     r"messages\[0\]: unknown role 'narrator'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "chat", r"messages\[0\]: no `content`"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "chat",
     r"messages\[0\]: `content` holds int"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}, "chat",
     r"messages\[1\]: `content` holds NoneType"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, "chat",
     r"messages\[0\]: `content` holds list"),
    ({"messages": ["hi", {"role": "assistant", "content": "y"}]}, "chat", r"messages\[0\]: expected an object"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}, "chat",
     "no assistant turn"),
    ({"prompt": "Q"}, "prompt-completion", r"needs the field\(s\) \['completion'\]"),
    ({"prompt": "Q", "completion": ""}, "prompt-completion", "`completion` is empty"),
    ({"prompt": "Q", "completion": " \n "}, "prompt-completion", "`completion` is empty"),
    ({"prompt": "Q", "completion": None}, "prompt-completion", "`completion` is empty"),
    ({"prompt": "Q", "completion": []}, "prompt-completion", "`completion` is empty"),
    ({"prompt": "Q", "completion": [{"role": "assistant", "content": "A"}]}, "prompt-completion",
     "`prompt` holds str, `completion` list"),
    ({"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "user", "content": "A"}]},
     "prompt-completion", "the completion has no assistant turn"),
    ({"prompt": [], "completion": [{"role": "assistant", "content": "A"}]}, "prompt-completion",
     "`prompt` is an empty conversation"),
    ({"text": 5}, "text", "field 'text' holds int"),
]


@pytest.mark.parametrize("row,fmt,message", BAD_ROWS)
def test_bad_rows_are_refused_naming_the_row(tokenizers, row, fmt, message):
    with pytest.raises(DocumentError, match=f"^{WHERE}: .*{message}"):
        validate_row(row, fmt, WHERE)
    with pytest.raises(ValueError, match=f"^{WHERE}: .*{message}"):  # DocumentError is a ValueError: mft exits 2
        render(row, tokenizers["smollm2"], fmt, where=WHERE)


def test_no_assistant_turn_is_fine_when_training_on_everything(tokenizers):
    messages = [{"role": "user", "content": "a question left unanswered"}]
    ids, trained = render({"messages": messages}, tokenizers["llama3"], "chat", "all")
    assert ids == transformers_ids(tokenizers["llama3"], messages) and all(trained[1:])


def test_detect_format():
    assert detect_format({"messages": [], "text": "x"}) == "chat"
    assert detect_format({"prompt": "a", "completion": "b", "text": "x"}) == "prompt-completion"
    assert detect_format({"text": "x", "prompt": "a"}) == "text"
    assert detect_format({"body": "x"}, text_field="body") == "text"
    assert detect_format({"messages": [], "text": "x"}, force="text") == "text"
    with pytest.raises(DocumentError, match=f"^{WHERE}: a prompt-completion row needs both"):
        detect_format({"prompt": "a"}, where=WHERE)
    with pytest.raises(DocumentError, match="ShareGPT"):
        detect_format({"conversations": [{"from": "human", "value": "hi"}]}, where=WHERE)
    with pytest.raises(DocumentError, match=f"^{WHERE}: no `messages`"):
        detect_format({"body": "x"}, where=WHERE)
    with pytest.raises(DocumentError, match=r"a 'chat' row needs the field\(s\) \['messages'\]"):
        detect_format({"text": "x"}, force="chat", where=WHERE)
    with pytest.raises(DocumentError, match="format must be one of"):
        detect_format({"text": "x"}, force="sharegpt")


def trl_prompt_completion(tok, prompt, completion):
    """TRL's SFTTrainer on a standard prompt-completion row: EOS appended to the completion, prompt + completion
    tokenized as one text, the completion mask starting after the prompt's own tokens."""
    if not completion.endswith(tok.eos_token):
        completion += tok.eos_token
    prompt_ids = tok(prompt)["input_ids"]
    ids = tok(prompt + completion)["input_ids"]
    return ids, [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids)), ids[: len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("bos", [False, True])
def test_prompt_completion_strings_follow_trl(bos):
    tok = make_tokenizer(None, bos=bos)
    for prompt, completion in [("Copyright notice:", " the above copyright notice shall be included"),
                               ("Q: may I copy it?\nA:", " yes</s>"), ("", "the software")]:
        ids, trained = render({"prompt": prompt, "completion": completion}, tok, "prompt-completion")
        ref_ids, ref_mask, aligned = trl_prompt_completion(tok, prompt, completion)
        assert aligned and ids == ref_ids
        assert trained == [False] + [bool(m) for m in ref_mask[1:]]
        assert ids[-1] == tok.eos_token_id and trained[-1]  # the EOS is trained: the model learns to stop
        if prompt or bos:  # (with neither, the completion's first token is the row's first: nothing predicts it)
            assert tok.decode([t for t, x in zip(ids, trained) if x]) == completion.removesuffix("</s>") + "</s>"


def test_prompt_completion_boundary_inside_a_token():
    """Where a BPE merge crosses from the prompt into the completion, the merged token holds completion text and
    is trained (TRL would start one token later and warn)."""
    tok = make_tokenizer(None, bos=False)
    prompt, completion = "The ", "licence is granted"
    prompt_ids = tok(prompt)["input_ids"]
    ids, trained = render({"prompt": prompt, "completion": completion}, tok, "prompt-completion")
    assert ids[: len(prompt_ids)] != prompt_ids  # the case is real: the prompt's last " " joins " li"
    first = trained.index(True)
    assert tok.decode(ids[:first]) == prompt[: len(tok.decode(ids[:first]))]  # untrained: prompt text only
    assert tok.decode(ids[first:]).endswith(completion + "</s>") and all(trained[first:])


@pytest.mark.parametrize("name", ["smollm2", "llama3", "gemma3", "smollm2-generation"])
def test_conversational_prompt_completion(tokenizers, name):
    tok = tokenizers[name]
    few_shot = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "licence of the kernel?"}]
    completion = [{"role": "assistant", "content": "GPL-2.0"}]
    ids, trained = render({"prompt": few_shot, "completion": completion}, tok, "prompt-completion")
    assert ids == transformers_ids(tok, few_shot + completion)
    prompt_ids = transformers_ids(tok, few_shot, add_generation_prompt=True)
    assert ids[: len(prompt_ids)] == prompt_ids and not any(trained[: len(prompt_ids)])  # the prompt's "4" too
    assert [tok.decode(ids[s:e]) for s, e in spans(trained)] == [expected_turn(name, "GPL-2.0")]


def test_train_on_all_and_text_rows(tokenizers):
    tok = tokenizers["llama3"]
    for row, fmt in [({"messages": CONVERSATIONS[1]}, "chat"), ({"prompt": "a", "completion": "b"}, "prompt-completion"),
                     ({"text": "The software is provided as is."}, "text")]:
        ids, trained = render(row, tok, fmt, "all")
        assert trained == [False] + [True] * (len(ids) - 1)
    text = "Permission is hereby granted, free of charge."
    ids, trained = render({"text": text}, tok, "text")  # a text row trains every label, like plain documents
    assert ids == encode_documents([text], tok)[0] and trained == [False] + [True] * (len(ids) - 1)
    with pytest.raises(DocumentError, match="train_on must be one of"):
        render({"text": text}, tok, "text", "prompts")


def test_template_fingerprint(tokenizers):
    assert template_fingerprint(make_tokenizer(None, bos=False)) == "none"
    fps = {name: template_fingerprint(tok) for name, tok in tokenizers.items()}
    assert len(set(fps.values())) == len(fps)
    assert fps["llama3"] == hashlib.sha256(CHAT_TEMPLATES["llama3"].encode()).hexdigest()
    assert template_fingerprint(make_chat_tokenizer("llama3")) == fps["llama3"]


def test_rendered_rows_packed_train_exactly_the_assistant_tokens(tokenizers):
    """Rows rendered, then packed whole: the labels the packed rows train are the assistant turns' tokens, each
    predicted from inside its own conversation."""
    tok = tokenizers["smollm2"]
    rendered = [render({"messages": m}, tok, "chat") for m in CONVERSATIONS * 3]
    seq_len = 2 * max(len(ids) for ids, _ in rendered) + 5
    packed = pack_documents(rendered, seq_len, pad_id=tok.pad_token_id)
    assert packed.num_rows < len(rendered)  # several conversations share rows
    labels = []
    for r in range(packed.num_rows):
        labels += [int(packed.input_ids[r, t + 1]) for t in range(seq_len - 1) if packed.label_mask[r, t]]
    want = [t for ids, trained in rendered for t, x in zip(ids, trained) if x]
    assert labels == want


# -- long conversations: bounded before the quadratic prefix renders --------------------------------------------------
def _conversation(n: int) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(n)]


@pytest.mark.parametrize("fmt", ["chat", "prompt-completion"])
def test_a_conversation_of_thousands_of_messages_is_refused_before_it_is_rendered(tokenizers, fmt):
    messages = _conversation(6000)
    row = {"messages": messages} if fmt == "chat" else {"prompt": messages[:3000], "completion": messages[3000:]}
    with pytest.raises(DocumentError, match=f"^{WHERE}: .* 6,000 messages; a conversation holds at most "
                                            f"{chat.MAX_MESSAGES:,}"):
        render(row, tokenizers["smollm2"], fmt, where=WHERE, method="turns")
    messages = _conversation(chat.MAX_MESSAGES)
    validate_row({"messages": messages}, "chat", WHERE)  # as many as allowed: not refused for its length


@pytest.mark.parametrize("method", ["turns", "markers"])
@pytest.mark.parametrize("train_on", ["completion", "all"])
def test_a_conversation_longer_than_a_row_is_refused_as_soon_as_a_prefix_is(tokenizers, method, train_on):
    tok = tokenizers["smollm2-generation"]
    messages = _conversation(chat.MAX_MESSAGES)
    fits = render({"messages": messages[:3]}, tok, "chat", train_on, where=WHERE, method=method)
    row = len(fits[0])  # the first three messages fit, the first four do not
    calls = []
    real = tok.apply_chat_template
    tok.apply_chat_template = lambda m, **kw: calls.append(len(m)) or real(m, **kw)
    try:
        with pytest.raises(DocumentError, match=f"^{WHERE}: the conversation renders to (more than {row} tokens "
                                                rf"\(its first 4 messages alone to [\d,]+\)|[\d,]+ tokens), more "
                                                rf"than a row holds \(--seq-len {row}\)"):
            render({"messages": messages}, tok, "chat", train_on, where=WHERE, method=method, max_tokens=row)
    finally:
        del tok.apply_chat_template
    prefixes = method == "turns" and train_on == "completion"
    assert max(calls) == 4 if prefixes else calls == [chat.MAX_MESSAGES], calls  # no prefix of 5 rendered
    assert render({"messages": messages[:3]}, tok, "chat", train_on, where=WHERE, method=method,
                  max_tokens=row) == fits  # a conversation that fits: as without the bound


@pytest.mark.parametrize("row, fmt", [({"text": "word " * 200}, "text"),
                                      ({"prompt": "word " * 100, "completion": " more " * 100}, "prompt-completion")])
def test_a_text_or_prompt_completion_row_longer_than_max_tokens_is_refused(row, fmt):
    tok = make_tokenizer(None, bos=False)
    ids, _ = render(row, tok, fmt, "all")
    what = "document" if fmt == "text" else "row"
    with pytest.raises(DocumentError, match=f"^{WHERE}: the {what} renders to {len(ids):,} tokens, more than a row "
                                            r"holds \(--seq-len 64\)"):
        render(row, tok, fmt, "all", where=WHERE, max_tokens=64)
    assert render(row, tok, fmt, "all", max_tokens=len(ids)) == render(row, tok, fmt, "all")
