"""Chat and instruction rows: their format, their checks, and their token ids with the mask of trained labels.

Formats follow TRL's dataset conventions: "chat" (`messages`), "prompt-completion" (`prompt` and `completion`,
standard or conversational) and "text"; `detect_format` decides from a row's fields. `render` gives a row's ids
and `trained[t]` (whether token t is a trained label; `trained[0]` is always False): with train_on="completion",
the assistant turns (found by `{% generation %}` markers, else by rendering the conversation prefix by prefix) or
the completion and its EOS; with "all", every label. docs/CHAT.md states every rule, and what is refused.
Prefix renders cost time quadratic in a conversation's length: a conversation holds at most MAX_MESSAGES messages,
and with `max_tokens` (a row's length) one is refused (RowTooLong) as soon as a prefix outgrows it. `fit_conversation`
cuts a conversation that is too long at a turn boundary (--long-rows truncate, rows/long_rows.py).
"""
from __future__ import annotations

import hashlib
import json
import re

from .documents import DocumentError

ROW_FORMATS = ("text", "chat", "prompt-completion")
TRAIN_ON = ("completion", "all")
ROLES = ("system", "user", "assistant", "tool")  # tool results are context, never trained
METHODS = ("auto", "markers", "turns")
MAX_MESSAGES = 1024  # messages in one conversation (a prompt and its completion together); more is refused
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def detect_format(row: dict, force: str | None = None, text_field: str = "text", where: str = "row") -> str:
    """The format of a row: "chat" (a `messages` field), "prompt-completion" (`prompt` and `completion`) or
    "text" (`text_field`), in that order; `force` (one of ROW_FORMATS) skips the guess but still needs its fields.
    Raises DocumentError naming `where` when no format fits."""
    if not isinstance(row, dict):
        raise DocumentError(f"{where}: expected an object with fields, got {type(row).__name__}")
    needs = {"chat": ("messages",), "prompt-completion": ("prompt", "completion"), "text": (text_field,)}
    if force is not None:
        if force not in ROW_FORMATS:
            raise DocumentError(f"the format must be one of {ROW_FORMATS}; got {force!r}")
        missing = [f for f in needs[force] if f not in row]
        if missing:
            raise DocumentError(f"{where}: a {force!r} row needs the field(s) {missing} "
                                f"(fields: {sorted(row)[:10]})")
        return force
    for fmt in ("chat", "prompt-completion", "text"):
        if all(f in row for f in needs[fmt]):
            return fmt
    if "conversations" in row:
        raise DocumentError(f"{where}: a `conversations` field (ShareGPT's from/value turns) is not read; convert "
                            "it to `messages`, a list of {'role', 'content'}")
    if "prompt" in row or "completion" in row:
        raise DocumentError(f"{where}: a prompt-completion row needs both `prompt` and `completion` "
                            f"(fields: {sorted(row)[:10]})")
    raise DocumentError(f"{where}: no `messages`, no `prompt` and `completion`, no {text_field!r} field "
                        f"(fields: {sorted(row)[:10]})")


def _check_messages(messages, where: str, what: str) -> None:
    if not isinstance(messages, list):
        raise DocumentError(f"{where}: `{what}` holds {type(messages).__name__}, expected a list of messages")
    if not messages:
        raise DocumentError(f"{where}: `{what}` is an empty conversation")
    _check_count(len(messages), where, f"`{what}` holds")
    for i, m in enumerate(messages):
        at = f"{where}: {what}[{i}]"
        if not isinstance(m, dict):
            raise DocumentError(f"{at}: expected an object with `role` and `content`, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise DocumentError(f"{at}: unknown role {role!r}; expected one of {ROLES}")
        if "content" not in m:
            raise DocumentError(f"{at}: no `content`")
        if not isinstance(m["content"], str):
            raise DocumentError(f"{at}: `content` holds {type(m['content']).__name__}, expected text (lists of "
                                "content parts, images and tool calls are not read)")


def _check_count(n: int, where: str, holds: str) -> None:
    if n > MAX_MESSAGES:
        raise DocumentError(f"{where}: {holds} {n:,} messages; a conversation holds at most {MAX_MESSAGES:,} (split "
                            "it into shorter ones)")


def _has_assistant(messages) -> bool:
    return any(m["role"] == "assistant" for m in messages)


def validate_row(row: dict, fmt: str, where: str = "row", train_on: str = "completion",
                 text_field: str = "text") -> None:
    """Refuse a row that cannot be rendered as `fmt`, with a DocumentError (a ValueError) naming `where`.

    Refused: fields of the wrong type; a conversation that is empty, holds a message that is not an object, has
    an unknown role (ROLES) or a content that is not a string; with train_on="completion", a conversation with no
    assistant turn; a completion that is missing or empty (only whitespace; a conversational completion without an
    assistant turn); a prompt and a completion of different kinds (a string and a list). A text row's empty text
    is not refused here (the reader skips and counts empty documents)."""
    if train_on not in TRAIN_ON:
        raise DocumentError(f"train_on must be one of {TRAIN_ON}; got {train_on!r}")
    fmt = detect_format(row, force=fmt, text_field=text_field, where=where)
    if fmt == "text":
        value = row[text_field]
        if value is not None and not isinstance(value, str):
            raise DocumentError(f"{where}: field {text_field!r} holds {type(value).__name__}, expected text")
        return
    if fmt == "chat":
        _check_messages(row["messages"], where, "messages")
        if train_on == "completion" and not _has_assistant(row["messages"]):
            raise DocumentError(f"{where}: the conversation has no assistant turn, so nothing to train on "
                                "(training on completions trains the assistant turns)")
        return
    prompt, completion = row["prompt"], row["completion"]
    if completion is None or (isinstance(completion, (str, list)) and not completion):
        raise DocumentError(f"{where}: `completion` is empty")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise DocumentError(f"{where}: `completion` is empty (only whitespace)")
        return
    if isinstance(prompt, list) and isinstance(completion, list):
        _check_count(len(prompt) + len(completion), where, "`prompt` and `completion` hold")
        _check_messages(prompt, where, "prompt")
        _check_messages(completion, where, "completion")
        if train_on == "completion" and not _has_assistant(completion):
            raise DocumentError(f"{where}: the completion has no assistant turn, so nothing to train on")
        return
    kinds = f"`prompt` holds {type(prompt).__name__}, `completion` {type(completion).__name__}"
    raise DocumentError(f"{where}: {kinds}; expected two strings, or two lists of messages")


# -- rendering -------------------------------------------------------------------------------------

def _template(tokenizer) -> str | dict | None:
    return getattr(tokenizer, "chat_template", None)


def template_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's chat template (several named templates: of them all, by name), or "none"."""
    template = _template(tokenizer)
    if not template:
        return "none"
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def has_generation_markers(tokenizer) -> bool:
    """Whether the chat template marks assistant tokens with {% generation %} ... {% endgeneration %}."""
    template = _template(tokenizer)
    texts = [template] if isinstance(template, str) else list((template or {}).values())
    return any(isinstance(t, str) and _GENERATION.search(t) for t in texts)


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    return ids


def _apply(tokenizer, messages, where: str, **kwargs):
    try:
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except Exception as e:  # a template's raise_exception, an undefined variable, a missing template
        raise DocumentError(f"{where}: the tokenizer's chat template cannot render this conversation "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})") from None


def _chat_ids(tokenizer, messages, where: str, **kwargs) -> list[int]:
    return [int(t) for t in _apply(tokenizer, messages, where, **kwargs)["input_ids"]]


def _not_extending(where: str, i: int, detail: str) -> DocumentError:
    return DocumentError(
        f"{where}: message {i}: the chat template's render of the conversation up to this message does not "
        f"extend its render of the messages before it token for token ({detail}); the assistant turns cannot "
        "be told apart from the rest. Templates that drop earlier reasoning or depend on the last message do "
        "this; use a template with {% generation %} markers, or train on every token (--train-on all)")


class RowTooLong(DocumentError):
    """A row that renders to more tokens than a row holds (`max_tokens`); `.length` is its length, or the length of
    the first prefix found too long."""

    def __init__(self, message: str, length: int):
        super().__init__(message)
        self.length = length


def too_long(where: str, what: str, n: int, max_tokens: int, prefix: int | None = None) -> RowTooLong:
    """The refusal of a `what` ("conversation", "row", "document") of `n` tokens (or, with `prefix`, whose first
    `prefix` messages alone render to `n`) where a row holds `max_tokens`."""
    length = f"{n:,} tokens"
    if prefix is not None:
        first = "message" if prefix == 1 else f"{prefix:,} messages"
        length = f"more than {max_tokens:,} tokens (its first {first} alone to {n:,})"
    return RowTooLong(f"{where}: the {what} renders to {length}, more than a row holds (--seq-len {max_tokens}); "
                      "it is refused (--long-rows refuse): --long-rows drop leaves it out, --long-rows truncate keeps "
                      "a conversation's first whole turns that fit; or shorten it, or raise --seq-len", n)


def _turn_mask(tokenizer, messages, first: int, where: str,
               max_tokens: int | None = None) -> tuple[list[int], list[bool]]:
    """Ids of the whole conversation and the trained labels of its assistant turns from index `first` on,
    from renders of its prefixes (see the module docstring); refused as soon as a prefix has more than
    `max_tokens` tokens."""
    special = _special_ids(tokenizer)
    prev: list[int] = []
    spans = []
    for i, message in enumerate(messages):
        cur = _chat_ids(tokenizer, messages[: i + 1], where)
        if max_tokens is not None and len(cur) > max_tokens and i + 1 < len(messages):
            raise too_long(where, "conversation", len(cur), max_tokens, prefix=i + 1)
        if cur[: len(prev)] != prev:
            raise _not_extending(where, i, f"{len(prev)} tokens before it, of which the first "
                                 f"{_common(prev, cur)} are kept")
        if message["role"] == "assistant" and i >= first:
            gen = _chat_ids(tokenizer, messages[:i], f"{where}: the prompt before message {i}",
                            add_generation_prompt=True)
            if gen[: len(prev)] != prev or cur[: len(gen)] != gen:
                raise _not_extending(where, i, "the generation prompt is not where the assistant turn starts")
            turn = cur[len(gen):]
            last = max((j for j, t in enumerate(turn) if t in special), default=len(turn) - 1)
            spans.append((len(gen), len(gen) + last + 1))
        prev = cur
    trained = [False] * len(prev)
    for start, end in spans:
        trained[start:end] = [True] * (end - start)
    return prev, trained


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _marker_mask(tokenizer, messages, first: int, where: str) -> tuple[list[int], list[bool]]:
    out = _apply(tokenizer, messages, where, return_assistant_tokens_mask=True)
    ids = [int(t) for t in out["input_ids"]]
    trained = [bool(m) for m in out["assistant_masks"]]
    if first:
        prompt = _chat_ids(tokenizer, messages[:first], f"{where}: the prompt", add_generation_prompt=True)
        if ids[: len(prompt)] != prompt:
            raise _not_extending(where, first, "the prompt's render is not a prefix of the whole")
        trained[: len(prompt)] = [False] * len(prompt)
    return ids, trained


def _render_chat(tokenizer, messages, first: int, train_on: str, where: str, method: str,
                 max_tokens: int | None = None):
    if not _template(tokenizer):
        raise DocumentError(f"{where}: the tokenizer has no chat template, which rows with messages need; "
                            "use a chat model's tokenizer or set tokenizer.chat_template")
    if train_on == "all":
        ids = _chat_ids(tokenizer, messages, where)
        return ids, [True] * len(ids)
    if method == "auto":
        method = "markers" if has_generation_markers(tokenizer) and getattr(tokenizer, "is_fast", False) else "turns"
    if method == "markers":
        if not has_generation_markers(tokenizer):
            raise DocumentError("method='markers' needs a chat template with {% generation %} markers")
        return _marker_mask(tokenizer, messages, first, where)
    return _turn_mask(tokenizer, messages, first, where, max_tokens)


def _render_prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
    eos = getattr(tokenizer, "eos_token", None)
    if eos and not completion.endswith(eos):
        completion = completion + eos
    prompt_ids = [int(t) for t in tokenizer(prompt, add_special_tokens=True)["input_ids"]]
    ids = [int(t) for t in tokenizer(prompt + completion, add_special_tokens=True)["input_ids"]]
    start = _common(prompt_ids, ids)
    return ids, [t >= start for t in range(len(ids))]


def render(row: dict, tokenizer, fmt: str, train_on: str = "completion", *, where: str = "row",
           text_field: str = "text", method: str = "auto",
           max_tokens: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of a row and which of them are trained labels (see the module docstring).

    Args:
        row: the row's fields.
        tokenizer: a transformers tokenizer (its chat template for chat rows).
        fmt: one of ROW_FORMATS (detect_format's answer, or a forced format).
        train_on: "completion" (assistant turns, completions) or "all" (every label).
        where: the row's place for error messages, e.g. "--data chats.jsonl: line 3".
        text_field: the field of text rows.
        method: how assistant turns are found: "auto" ("markers" where the template has {% generation %}
            markers and the tokenizer is fast, else "turns"), "markers", or "turns".
        max_tokens: the most tokens a row holds (--seq-len, where documents are packed whole), or None: a row that
            renders to more is refused, a conversation as soon as a prefix of it does.
    Returns:
        (ids, trained), two lists of the same length; trained[0] is False; with train_on="completion" at least
        one label is trained.
    Raises:
        DocumentError naming `where`: a bad row (validate_row), a template that refuses the conversation or
        whose prefix renders do not extend each other, a row with no trained label; RowTooLong (a DocumentError), a
        row of more than `max_tokens` tokens.
    """
    if method not in METHODS:
        raise DocumentError(f"method must be one of {METHODS}; got {method!r}")
    validate_row(row, fmt, where, train_on, text_field)
    if fmt == "text":
        eos = getattr(tokenizer, "eos_token_id", None)
        ids = [int(t) for t in tokenizer(row[text_field] or "", add_special_tokens=True)["input_ids"]]
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(int(eos))
        trained = [True] * len(ids)
    elif fmt == "chat":
        ids, trained = _render_chat(tokenizer, row["messages"], 0, train_on, where, method, max_tokens)
    elif isinstance(row["prompt"], str):
        ids, trained = _render_prompt_completion(tokenizer, row["prompt"], row["completion"])
        if train_on == "all":
            trained = [True] * len(ids)
    else:
        messages = row["prompt"] + row["completion"]
        ids, trained = _render_chat(tokenizer, messages, len(row["prompt"]), train_on, where, method, max_tokens)
    if max_tokens is not None and len(ids) > max_tokens:
        what = "conversation" if fmt == "chat" else "row" if fmt != "text" else "document"
        raise too_long(where, what, len(ids), max_tokens)
    if trained:
        trained[0] = False  # nothing predicts the first token
    if train_on == "completion" and not any(trained):
        raise DocumentError(f"{where}: no token of the completion or the assistant turns is left to train on "
                            "(the chat template marked none, or the completion renders to no token)")
    return ids, trained


def fit_conversation(row: dict, tokenizer, train_on: str = "completion", *, where: str = "row",
                     method: str = "auto", max_tokens: int) -> tuple[list[int], list[bool]] | None:
    """A chat row cut at a turn boundary to fit `max_tokens` tokens: render's answer for its longest prefix of whole
    messages that ends with an assistant turn and renders to at most `max_tokens` tokens, so that every answer kept is
    whole, its end token included; None where not even the messages up to the first assistant turn fit. The
    prefixes are rendered in order until one is too long (the renders of a conversation's prefixes grow with it)."""
    messages = row["messages"]
    keep = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if len(_chat_ids(tokenizer, messages[: i + 1], where)) > max_tokens:
            break
        keep = i + 1
    if not keep:
        return None
    return render({"messages": messages[:keep]}, tokenizer, "chat", train_on, where=where, method=method,
                  max_tokens=max_tokens)
