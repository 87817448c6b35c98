"""Documents longer than a row where documents are packed whole (--long-rows drop|truncate|refuse), on tiny models:
refuse exits 2 naming the row and the flag with no cache; drop builds the cache without them and records their count
and indices in the manifest; truncate keeps whole turns (no answer without its end) and drops what cannot be cut;
prompt-completion rows, and text documents (cut into windows whatever the policy); the online teacher's --data,
--replay documents and the evaluation sets follow the flag; data.long_rows of a hostile manifest is refused naming
the key; the policy is part of the cache's identity, and a cache built before the flag is still complete for the
same command; bad values are refused naming the flag."""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import read_manifest, resign
from mft_cache.cli import main
from mft_cache.pipeline.cache import CacheConfig, build_cache, rows_identity
from mft_cache.rows import DocumentStream, RowSpec, stream_batches
from mft_cache.rows.chat import render
from mft_cache.rows.long_rows import LongRows
from mft_cache.storage import ManifestError, open_cache
from mft_cache.testing import WORDS, make_chat_tokenizer, make_model, make_tokenizer

SEQ = 128
VOCAB = 320  # the tokenizer's 300 ids and the chat template's special tokens
EOT = "<|eot_id|>"  # llama3's end of turn: the last token of every answer


def say(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def exchanges(n: int, seed: int, user: int = 2, answer: int = 3) -> dict:
    """A conversation: a system message, then n user/assistant exchanges."""
    rng = random.Random(seed)
    messages = [{"role": "system", "content": say(rng, 1)}]
    for _ in range(n):
        messages += [{"role": "user", "content": say(rng, user)}, {"role": "assistant", "content": say(rng, answer)}]
    return {"messages": messages}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def length(tok, messages) -> int:
    return len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("long-rows")


@pytest.fixture(scope="module")
def tok():
    return make_chat_tokenizer("llama3")


@pytest.fixture(scope="module")
def llama_chat(root) -> Path:
    folder = root / "llama-llama3"
    make_model(folder, "llama", vocab_size=VOCAB)
    make_chat_tokenizer("llama3").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rows(tok) -> list[dict]:
    """Six conversations: line 3 (index 2) is four exchanges, longer than a row but its first three fit; line 5
    (index 4) has a first exchange longer than a row; the others fit."""
    out = [exchanges(1 + i % 2, seed=i) for i in range(6)]
    out[2] = exchanges(4, seed=20)
    rng = random.Random(21)
    out[4] = {"messages": [{"role": "user", "content": say(rng, 40)}, {"role": "assistant", "content": say(rng, 3)},
                           {"role": "user", "content": say(rng, 1)}, {"role": "assistant", "content": say(rng, 1)}]}
    assert length(tok, out[2]["messages"]) > SEQ >= length(tok, out[2]["messages"][:7])
    assert length(tok, out[4]["messages"][:2]) > SEQ
    assert all(length(tok, r["messages"]) <= SEQ for i, r in enumerate(out) if i not in (2, 4))
    return out


@pytest.fixture(scope="module")
def chats(root, rows) -> Path:
    return write_rows(root / "chats.jsonl", rows)


def build(model: Path, data: Path, out: Path, **options):
    return build_cache(CacheConfig(model=str(model), data=str(data), out=str(out), seq_len=SEQ, top_k=4,
                                   batch_size=4, **options)).to_json()


@pytest.fixture(scope="module")
def dropped(root, llama_chat, chats) -> Path:
    out = root / "drop"
    build(llama_chat, chats, out)  # the default
    return out


def documents(folder: Path) -> list[tuple[list[int], list[bool]]]:
    """(ids, label mask of its positions) of each document of a cache packed whole, in order."""
    cache = open_cache(folder)
    out = []
    for p in np.load(folder / "documents.npy")[:-1]:
        r, s = divmod(int(p), cache.seq_len)
        row = cache[r]
        seg = row["segment_ids"].numpy()
        n = int((seg == seg[s]).sum())
        out.append((row["input_ids"][s:s + n].tolist(), row["label_mask"][s:s + n - 1].tolist()))
    return out


# -- the three policies on a chat corpus ------------------------------------------------------------------------
def test_refuse_exits_2_naming_the_row_and_the_flag_and_leaves_no_cache(llama_chat, chats, tmp_path, capsys,
                                                                        reliability):
    out = tmp_path / "out"
    assert main(["cache", "--model", str(llama_chat), "--data", str(chats), "--out", str(out), "--seq-len", str(SEQ),
                 "--top-k", "4", "--long-rows", "refuse"]) == 2
    errors = [x for x in re.split(r"[\r\n]", capsys.readouterr().err) if "error:" in x]
    assert len(errors) == 1 and errors[0].startswith(f"mft cache: error: --data {chats}: line 3: the conversation "
                                                     "renders to "), errors
    assert f"more than a row holds (--seq-len {SEQ}); it is refused (--long-rows refuse)" in errors[0]
    assert "--long-rows drop" in errors[0] and "--long-rows truncate" in errors[0]
    assert not (out / "manifest.json").exists() and not any(out.glob("shard-*"))
    reliability("hostile input", "chat data: a conversation longer than --seq-len, --long-rows refuse",
                "exit 2 naming the file, the row and --long-rows; no manifest, no shard")


def test_drop_builds_the_cache_without_them_and_records_them(dropped, rows, tok, root, llama_chat, chats, caplog):
    m = read_manifest(dropped)
    assert m["data"]["long_rows"] == {"policy": "drop", "dropped": 2, "first_dropped": [2, 4], "truncated": 0,
                                      "first_truncated": []}
    assert m["config"]["long_rows"] == "drop" and m["data"]["num_documents"] == 4
    kept = [render(r, tok, "chat") for i, r in enumerate(rows) if i not in (2, 4)]
    assert documents(dropped) == [(ids, trained[1:]) for ids, trained in kept]
    assert open_cache(dropped, verify="full").manifest.data.long_rows["dropped"] == 2
    with caplog.at_level(logging.WARNING):  # the warning names the source, the count and the rows
        build(llama_chat, chats, root / "drop-again")
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"--data {chats}: 2 rows longer than a row (--seq-len {SEQ}): 2 dropped "
                              "(--long-rows drop)"), warning
    assert "line 3 (dropped)" in warning and "line 5 (dropped)" in warning


def test_truncate_keeps_whole_turns_and_never_a_cut_answer(root, llama_chat, chats, rows, tok):
    out = root / "truncate"
    m = build(llama_chat, chats, out, long_rows="truncate")
    assert m["data"]["long_rows"] == {"policy": "truncate", "dropped": 1, "first_dropped": [4], "truncated": 1,
                                      "first_truncated": [2]}
    assert m["data"]["num_documents"] == 5 and m["config"]["long_rows"] == "truncate"
    docs = documents(out)
    messages = rows[2]["messages"]
    cut = render({"messages": messages[:7]}, tok, "chat")  # three whole exchanges: the longest prefix that fits
    assert length(tok, messages[:9]) > SEQ  # the next whole exchange does not
    assert docs[2] == (cut[0], cut[1][1:])
    full, _ = render(rows[2], tok, "chat")
    assert full[:len(cut[0])] == cut[0]  # a prefix of the whole conversation, cut after an answer's end
    eot = tok.convert_tokens_to_ids(EOT)
    ids, mask = docs[2]
    trained = [ids[t + 1] for t in range(len(mask)) if mask[t]]
    assert trained[-1] == eot and ids[-1] == eot
    runs = [ids[t + 1] for t in range(len(mask)) if mask[t] and (t + 1 == len(mask) or not mask[t + 1])]
    assert runs == [eot] * 3  # three answers trained, each to its end token
    others = [render(r, tok, "chat") for i, r in enumerate(rows) if i not in (2, 4)]
    assert [d for i, d in enumerate(docs) if i != 2] == [(a, b[1:]) for a, b in others]


# -- prompt-completion rows, text documents, and every row too long ----------------------------------------------
def spec(fmt: str, policy: str, packing: str = "document") -> RowSpec:
    return RowSpec(fmt, "completion" if fmt != "text" else "all", packing, 64, policy)


def batches(source: Path, tokenizer, fmt: str, policy: str):
    report = LongRows(policy)
    stream = DocumentStream(source, data_format=fmt)
    parts = list(stream_batches(stream, tokenizer, spec(fmt, policy), report))
    return parts, report, stream


@pytest.mark.parametrize("policy", ["drop", "truncate", "refuse"])
def test_a_prompt_completion_row_too_long_is_dropped_or_refused_never_cut(tmp_path, policy):
    tokenizer = make_tokenizer(None, bos=False)
    rows = [{"prompt": "who", "completion": " me"}, {"prompt": "word " * 80, "completion": " more"},
            {"prompt": "a", "completion": " b"}]
    data = write_rows(tmp_path / "pc.jsonl", rows)
    if policy == "refuse":
        with pytest.raises(ValueError, match=r"line 2: the row renders to [\d,]+ tokens, more than a row holds "
                                             r"\(--seq-len 64\); it is refused \(--long-rows refuse\)"):
            batches(data, tokenizer, "prompt-completion", policy)
        return
    parts, report, stream = batches(data, tokenizer, "prompt-completion", policy)
    assert report.record() == {"policy": policy, "dropped": 1, "first_dropped": [1], "truncated": 0,
                               "first_truncated": []}  # truncate would cut the completion: dropped too
    offsets = np.concatenate([p.doc_offsets for p in parts])
    assert len(offsets) == 2 + 1 and stream.num_documents == 3


@pytest.mark.parametrize("policy", ["drop", "truncate", "refuse"])
def test_a_text_document_too_long_under_document_packing_is_cut_into_windows(tmp_path, policy):
    """Whatever the policy: a text document is never dropped, cut short or refused (tests/test_text_documents.py)."""
    tokenizer = make_tokenizer(None, bos=False)
    data = write_rows(tmp_path / "t.jsonl", [{"text": "short one"}, {"text": "word " * 80}, {"text": "short two"}])
    parts, report, _ = batches(data, tokenizer, "text", policy)
    assert report.dropped == report.truncated == 0
    trained = sum(int(p.trained.sum()) for p in parts)
    docs = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in ("short one", "word " * 80, "short two")]
    assert trained == sum(len(d) - 1 for d in docs) and len(docs[1]) > 64
    assert len(np.concatenate([p.doc_offsets for p in parts])) == 3 + 1


def test_concat_packing_has_no_long_rows(tmp_path):
    """Under --packing concat a long conversation continues in the next row: nothing is dropped, whatever the flag."""
    tokenizer = make_chat_tokenizer("llama3")
    data = write_rows(tmp_path / "c.jsonl", [exchanges(4, seed=20)])
    report = LongRows("refuse")
    parts = list(stream_batches(DocumentStream(data, data_format="chat"), tokenizer, spec("chat", "refuse", "concat"),
                                report))
    assert sum(len(p.input_ids) for p in parts) > 1 and report.dropped == report.truncated == 0


def test_every_row_too_long_is_an_error_not_an_empty_cache(tmp_path):
    tokenizer = make_tokenizer(None, bos=False)
    data = write_rows(tmp_path / "pc.jsonl", [{"prompt": "word " * 80, "completion": " more"}] * 2)
    with pytest.raises(ValueError, match=r"every row \(2\) is longer than a row holds \(--seq-len 64\) and was "
                                         r"dropped \(--long-rows drop\).*raise --seq-len"):
        batches(data, tokenizer, "prompt-completion", "drop")


# -- stage two: the online teacher's --data, --replay documents, the evaluation sets -----------------------------
@pytest.mark.parametrize("flag", ["--data", "--replay", "--eval-specialized"])
@pytest.mark.parametrize("policy", ["drop", "truncate", "refuse"])
def test_stage_two_rows_follow_the_flag(chats, rows, tok, llama_chat, flag, policy, caplog):
    from mft_cache.trainer.config import TrainConfig
    from mft_cache.trainer.inputs import online_rows, open_eval_sets, open_replay

    cfg = TrainConfig(teacher="online", model=str(llama_chat), data=str(chats), objective="ft", long_rows=policy,
                      replay=str(chats), eval_specialized=str(chats), seq_len=SEQ)
    read = {"--data": lambda: online_rows(cfg, tok, SEQ),
            "--replay": lambda: open_replay(cfg, None, tok, SEQ),
            "--eval-specialized": lambda: open_eval_sets(cfg, tok, SEQ)["specialized"]}[flag]
    if policy == "refuse":
        with pytest.raises(ValueError, match=rf"^{flag} {chats}: line 3: .*\(--long-rows refuse\)"):
            read()
        return
    with caplog.at_level(logging.WARNING):
        got = read()
    expected = {"drop": [r for i, r in enumerate(rows) if i not in (2, 4)],
                "truncate": [{"messages": rows[2]["messages"][:7]} if i == 2 else r
                             for i, r in enumerate(rows) if i != 4]}[policy]
    trained = sum(sum(render(r, tok, "chat")[1][1:]) for r in expected)
    assert got.source.num_predictions == trained
    assert any(r.getMessage().startswith(f"{flag} {chats}: 2 rows longer than a row") for r in caplog.records)


# -- the manifest's data.long_rows, validated -------------------------------------------------------------------
GOOD = {"policy": "drop", "dropped": 2, "first_dropped": [2, 4], "truncated": 0, "first_truncated": []}
HOSTILE = {
    "not an object": ([1], r"key 'data\.long_rows' must be an object"),
    "unknown policy": ({**GOOD, "policy": "cut"}, r"key 'data\.long_rows\.policy' must be one of"),
    "missing count": ({k: v for k, v in GOOD.items() if k != "dropped"}, r"key 'data\.long_rows\.dropped' is missing"),
    "negative count": ({**GOOD, "dropped": -1}, r"key 'data\.long_rows\.dropped' must be an integer"),
    "boolean count": ({**GOOD, "dropped": True}, r"key 'data\.long_rows\.dropped' must be an integer"),
    "huge count": ({**GOOD, "dropped": 2**70}, r"key 'data\.long_rows\.dropped' must be an integer"),
    "indices not a list": ({**GOOD, "first_dropped": "2,4"}, r"key 'data\.long_rows\.first_dropped' must be a list"),
    "more indices than the count": ({**GOOD, "first_dropped": [1, 2, 4]},
                                    r"key 'data\.long_rows\.first_dropped' holds 3 indices; at most 2"),
    "a flood of indices": ({**GOOD, "dropped": 10**6, "first_dropped": list(range(10**5))},
                           r"key 'data\.long_rows\.first_dropped' holds 100,?000 indices; at most 100"),
    "an index that is no integer": ({**GOOD, "first_dropped": [2, "4"]},
                                    r"key 'data\.long_rows\.first_dropped\[1\]' must be a document index"),
    "a negative index": ({**GOOD, "first_dropped": [-1, 4]},
                         r"key 'data\.long_rows\.first_dropped\[0\]' must be a document index"),
    "indices not increasing": ({**GOOD, "first_dropped": [4, 2]},
                               r"key 'data\.long_rows\.first_dropped\[1\]' must be a document index in \[5,"),
    "refuse that dropped": ({**GOOD, "policy": "refuse"}, r"key 'data\.long_rows\.dropped' is 2, but --long-rows "
                            "refuse"),
    "drop that cut": ({**GOOD, "truncated": 1, "first_truncated": [3]},
                      r"key 'data\.long_rows\.truncated' is 1, but --long-rows drop cuts no document"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_long_rows_record_is_refused_naming_the_key(dropped, tmp_path, case, reliability):
    value, message = HOSTILE[case]
    folder = tmp_path / "c"
    shutil.copytree(dropped, folder)
    resign(folder, lambda m: m["data"].update(long_rows=value))
    with pytest.raises(ManifestError, match=message):
        open_cache(folder)
    reliability("hostile input", f"manifest data.long_rows: {case}", "ManifestError naming the key")


def test_a_manifest_without_long_rows_still_reads(dropped, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(dropped, folder)
    resign(folder, lambda m: m["data"].pop("long_rows"))
    assert open_cache(folder, verify="full").manifest.data.long_rows is None


# -- identity and resume ----------------------------------------------------------------------------------------
def test_the_policy_is_part_of_the_identity(dropped, llama_chat, chats, caplog):
    with caplog.at_level(logging.INFO):
        build(llama_chat, chats, dropped)  # the same command: complete
    assert any("already complete" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['long_rows'\]\)"):
        build(llama_chat, chats, dropped, long_rows="truncate")


def test_rows_that_are_never_too_long_record_no_policy(tok):
    """Plain text concatenated and chat concatenated cut long documents into rows: no policy in their identity, so a
    text cache keeps the identity it always had."""
    cfg = CacheConfig()
    assert rows_identity(cfg, RowSpec("text", "all", "concat", SEQ), tok) == {}
    assert "long_rows" not in rows_identity(cfg, RowSpec("chat", "completion", "concat", SEQ), tok)
    assert rows_identity(cfg, RowSpec("chat", "completion", "document", SEQ, "refuse"), tok)["long_rows"] == "refuse"


@pytest.mark.parametrize("policy", ["drop", "truncate", "refuse"])
def test_a_cache_built_before_the_flag_is_complete_for_every_policy(root, llama_chat, rows, tmp_path, policy, caplog):
    """A cache of documents packed whole made before --long-rows held every document whole (a longer one was
    refused): its identity, without the key, is the one each policy gives the same data."""
    data = write_rows(root / f"fit-{policy}.jsonl", [r for i, r in enumerate(rows) if i not in (2, 4)])
    out = tmp_path / "old"
    build(llama_chat, data, out, long_rows="refuse")

    def older(m):
        m["config"].pop("long_rows")
        m["data"].pop("long_rows")

    resign(out, older)
    before = (out / "manifest.json").read_bytes()
    with caplog.at_level(logging.INFO):
        build(llama_chat, data, out, long_rows=policy)
    assert any("already complete" in r.getMessage() for r in caplog.records)
    assert (out / "manifest.json").read_bytes() == before


def test_an_unfinished_build_from_before_the_flag_resumes(tmp_path):
    from mft_cache.storage import CacheWriter, cache_schema
    from mft_cache.storage.writer import PROGRESS

    schema = cache_schema(vocab_size=VOCAB, top_k=4, seq_len=SEQ, logprob_dtype="float16", segments=True)
    identity = {"packing": "document", "data_format": "chat", "train_on": "completion", "data_fingerprint": "f"}
    CacheWriter(tmp_path, fmt="zarr", schema=schema, identity=identity)  # as a build before --long-rows wrote it
    assert "long_rows" not in json.loads((tmp_path / PROGRESS).read_text())
    for policy in ("drop", "truncate"):
        assert CacheWriter(tmp_path, fmt="zarr", schema=schema, identity={**identity, "long_rows": policy}).state == \
            "resume"
    folder = tmp_path / "new"
    CacheWriter(folder, fmt="zarr", schema=schema, identity={**identity, "long_rows": "drop"})
    with pytest.raises(ValueError, match=r"unfinished cache built with another configuration \(differs in "
                                         r"\['long_rows'\]\)"):
        CacheWriter(folder, fmt="zarr", schema=schema, identity={**identity, "long_rows": "truncate"})


# -- bad values -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["cache", "train"])
def test_a_bad_flag_value_is_refused_naming_the_flag(command, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([command, "--long-rows", "cut"])
    assert e.value.code == 2
    assert re.search(r"argument --long-rows: invalid choice: 'cut'", capsys.readouterr().err)
    config = tmp_path / "c.yaml"
    config.write_text("long_rows: cut\n")
    with pytest.raises(SystemExit) as e:
        main([command, "--config", str(config)])
    assert e.value.code == 2 and "long_rows: 'cut' is not one of" in capsys.readouterr().err


def test_a_bad_value_in_the_keyword_api_is_refused_naming_the_flag():
    from mft_cache.trainer.config import TrainConfig

    for cls in (CacheConfig, TrainConfig):
        with pytest.raises(ValueError, match=r"--long-rows must be one of drop, truncate, refuse; got 'cut'"):
            cls(long_rows="cut")


def test_inspect_says_what_became_of_long_rows(dropped, capsys):
    from mft_cache.cli import main

    assert main(["inspect", str(dropped)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("documents longer than a row"))
    assert line.endswith("--long-rows drop; 2 dropped (first: 2, 4)")
    assert main(["inspect", "--json", str(dropped)]) == 0
    assert json.loads(capsys.readouterr().out)["long_rows"]["dropped"] == 2
