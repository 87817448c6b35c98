"""Chat and instruction data end to end on tiny models: the cache holds the teacher's values at the trained positions
only, equal to the teacher run on each conversation alone; rows rendered exactly as apply_chat_template; the
reader's per-row view; old readers refuse the layout; bad rows exit 2 naming the row with no cache; stage two
follows the cache (loss over trained positions equals a per-document reference, masked positions give nothing,
perplexity over trained positions, the online teacher and replay), and refuses a student that would render
otherwise."""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_texts, write_jsonl
from helpers import cache_args, snapshot, torchrun, write_legacy_copy
from reference import sparse_mft_loss
from mft_cache.cli import main
from mft_cache.pipeline.cache import CacheConfig, build_cache
from mft_cache.storage import ManifestError, open_cache
from mft_cache.rows.chat import render, template_fingerprint
from mft_cache.rows.documents import DocumentStream
from mft_cache.testing import WORDS, make_chat_tokenizer, make_model
from mft_cache.trainer.config import TrainConfig
from mft_cache.trainer.data import Rows
from mft_cache.trainer.evaluate import evaluate_perplexity_se
from mft_cache.trainer.inputs import open_eval_sets
from mft_cache.trainer.loss_module import StudentLoss
from mft_cache.trainer.targets import from_cache
from mft_cache.trainer.train import train

SEQ = 128  # the tiny tokenizers spell most words out: a short conversation is 30-120 tokens
VOCAB = 320  # the tokenizer's 300 ids and the chat templates' special tokens


def chat_model(root: Path, kind: str, template: str) -> Path:
    """A tiny model whose tokenizer carries a real chat template (storage/testing.CHAT_TEMPLATES)."""
    folder = root / f"{kind}-{template}"
    if not (folder / "config.json").exists():
        make_model(folder, kind, vocab_size=VOCAB)
        make_chat_tokenizer(template, bos=kind != "gpt2").save_pretrained(folder)
    return folder


def conversations(n: int, seed: int) -> list[dict]:
    """Short conversations of one or two exchanges, some with a system message (so SmolLM2's template writes no
    default one), one ending on a user turn."""
    rng = random.Random(seed)

    def say(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    out = []
    for i in range(n):
        messages = [{"role": "system", "content": say(1, 1)}] if i % 2 == 0 else []
        for _ in range(1 + (i % 4 == 1)):
            messages += [{"role": "user", "content": say(1, 2)}, {"role": "assistant", "content": say(1, 3)}]
        if i == 3:
            messages.append({"role": "user", "content": say(1, 2)})
        out.append({"messages": messages})
    return out


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chat")


@pytest.fixture(scope="module")
def llama_chat(root) -> Path:
    return chat_model(root, "llama", "llama3")


@pytest.fixture(scope="module")
def chats(root) -> Path:
    return write_rows(root / "chats.jsonl", conversations(14, seed=1))


@pytest.fixture(scope="module")
def chat_cache(root, llama_chat, chats) -> Path:
    out = root / "cache"
    build_cache(CacheConfig(model=str(llama_chat), data=str(chats), out=str(out), seq_len=SEQ, top_k=VOCAB,
                            logprob_dtype="float32", batch_size=3, shard_mb=0.05))
    return out


def documents_of(cache) -> list[tuple[int, int, int]]:
    """(row, start, length) of each document, from documents.npy (row * seq_len + start) and the segment ids."""
    starts = np.load(cache.folder / "documents.npy")[:-1]
    out = []
    for p in starts:
        r, s = divmod(int(p), cache.seq_len)
        seg = cache[r]["segment_ids"].numpy()
        out.append((r, s, int((seg == seg[s]).sum())))
    return out


def teacher_alone(model_dir: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)[:-1]  # (n-1, V)


@pytest.mark.parametrize("kind,template", [("llama", "llama3"), ("gpt2", "smollm2"), ("gemma3", "gemma3")])
def test_cache_holds_the_teacher_of_each_conversation_alone_at_its_trained_positions(root, kind, template):
    """Rows hold the conversations exactly as apply_chat_template renders them; the stored values are the teacher's
    full log_softmax of each conversation run alone, at the assistant tokens only; the rest reads as zeros."""
    model_dir = chat_model(root, kind, template)
    rows = conversations(10, seed=2)
    if template == "gemma3":  # Gemma's template folds the system message into the user turn: keep it alternating
        rows = [{"messages": [m for m in r["messages"] if m["role"] != "system"][:4]} for r in rows]
    if template == "smollm2":  # without one, its template writes a long default system message
        rows = [{"messages": ([] if r["messages"][0]["role"] == "system" else [{"role": "system", "content": "a"}])
                 + r["messages"]} for r in rows]
    data = write_rows(root / f"data-{kind}.jsonl", rows)
    out = root / f"cache-{kind}"
    manifest = build_cache(CacheConfig(model=str(model_dir), data=str(data), out=str(out), seq_len=SEQ, top_k=5,
                                       logprob_dtype="float32", batch_size=2, shard_mb=0.02,
                                       format="arrow" if kind == "gpt2" else "zarr")).to_json()
    cache = open_cache(out, verify="full")
    tok = make_chat_tokenizer(template, bos=kind != "gpt2")
    assert manifest["schema_version"] == 3 and manifest["packing"]["rule"] == "document"
    assert manifest["data"]["format"] == "chat" and manifest["data"]["train_on"] == "completion"
    assert manifest["data"]["chat_template_fingerprint"] == template_fingerprint(tok)
    located = documents_of(cache)
    assert len(located) == len(rows)
    trained_total = 0
    for row, (r, s, n) in zip(rows, located):
        ids, trained = render(row, tok, "chat")
        assert ids == list(tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])
        got = cache[r]
        assert got["input_ids"][s:s + n].tolist() == ids
        mask = got["label_mask"][s:s + n - 1].numpy()
        assert mask.tolist() == trained[1:]  # position t trains label t+1
        full = teacher_alone(model_dir, ids)  # (n-1, V)
        at = torch.from_numpy(mask)
        ref, ref_ids = full.topk(5, -1)
        torch.testing.assert_close(got["topk_logprobs"][s:s + n - 1][at], ref[at], rtol=1e-5, atol=2e-5)
        labels = torch.tensor(ids[1:])[at]
        torch.testing.assert_close(got["label_logprob"][s:s + n - 1][at], full[at].gather(1, labels[:, None])[:, 0],
                                   rtol=1e-5, atol=2e-5)
        assert (got["topk_logprobs"][s:s + n - 1][~at] == 0).all() and (got["topk_ids"][s:s + n - 1][~at] == 0).all()
        trained_total += int(mask.sum())
    assert manifest["num_tokens"] == trained_total


def test_the_cache_takes_bytes_for_trained_positions_only(root, llama_chat, chats, chat_cache):
    """--train-on all caches every position; the default caches the assistant turns: its teacher fields hold
    exactly that many positions."""
    everything = root / "cache-all"
    m_all = build_cache(CacheConfig(model=str(llama_chat), data=str(chats), out=str(everything), seq_len=SEQ,
                                    top_k=VOCAB, logprob_dtype="float32", batch_size=3, shard_mb=0.05, train_on="all")).to_json()
    m = json.loads((chat_cache / "manifest.json").read_text())
    assert m_all["num_input_tokens"] == m["num_input_tokens"] and m_all["num_tokens"] > 2 * m["num_tokens"]
    raw = open_cache(chat_cache).read_rows(0, m["num_sequences"], raw=True)
    assert len(raw["topk_ids"]) == len(raw["label_logprob"]) == m["num_tokens"] == raw["label_mask"].sum()
    assert raw["topk_ids"].shape[1:] == (VOCAB,)
    assert m["shard_bytes"] < 0.6 * m_all["shard_bytes"]


def test_an_old_reader_refuses_the_new_layout(chat_cache, monkeypatch):
    import mft_cache.storage.manifest as manifest_module

    monkeypatch.setattr(manifest_module, "READABLE_SCHEMA_VERSIONS", (1, 2))  # what the readers before it accept
    with pytest.raises(ManifestError, match="unknown schema_version 3"):
        open_cache(chat_cache)


def test_text_caches_keep_their_identity_in_the_one_layout(llama, docs_jsonl, tmp_path):
    """A text cache is written like every other (schema version 3: its label mask with its rows, no segment ids,
    values at the trained positions only) and keeps the identity it always had, so a finished cache of an earlier
    version is still this build's."""
    m = build_cache(CacheConfig(model=str(llama), data=str(docs_jsonl), out=str(tmp_path / "c"), seq_len=SEQ,
                                top_k=4)).to_json()
    assert m["schema_version"] == 3 and m["data"]["format"] == "text" and m["packing"]["rule"] == "bos-per-row"
    assert [f["name"] for f in m["schema"]][:3] == ["input_ids", "length", "label_mask"]
    assert not {"data_format", "train_on", "prompt_field", "chat_template_fingerprint"} & set(m["config"])
    assert m["config"]["packing"] == "bos-per-row"
    raw = open_cache(tmp_path / "c").read_rows(0, m["num_sequences"], raw=True)
    assert len(raw["label_logprob"]) == raw["label_mask"].sum() == m["num_tokens"]


def test_caches_of_every_earlier_schema_read_as_the_one_layout(llama, docs_jsonl, tmp_path):
    """A cache of schema version 1 (every position stored, no mask) gives the same rows, the same label mask (from
    its BOS rule) and the same training batches as the same cache in today's layout."""
    new = tmp_path / "new"
    build_cache(CacheConfig(model=str(llama), data=str(docs_jsonl), out=str(new), seq_len=SEQ, top_k=4,
                            shard_mb=0.01))
    write_legacy_copy(new, tmp_path / "old")
    old_cache, new_cache = open_cache(tmp_path / "old", verify="full"), open_cache(new, verify="full")
    assert old_cache.manifest.schema_version == 1 and len(old_cache.manifest.shards) > 1
    a, b = old_cache.read_rows(0, len(old_cache)), new_cache.read_rows(0, len(new_cache))
    assert a.keys() == b.keys() and "label_mask" in a and "segment_ids" not in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    rows = [3, 0, len(old_cache) - 1]
    x, y = Rows(old_cache).batch(rows), Rows(new_cache).batch(rows)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_chat_fingerprint_is_over_the_fields_read(tmp_path):
    """A row's fingerprint covers what is rendered (messages, or prompt and completion), not the other fields."""
    a = write_rows(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "x"}], "id": 1}])
    b = write_rows(tmp_path / "b.jsonl", [{"id": 2, "messages": [{"content": "x", "role": "user"}]}])
    c = write_rows(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "y"}]}])
    fps = []
    for path in (a, b, c):
        stream = DocumentStream(path, data_format="auto")
        rows = list(stream)
        assert stream.format == "chat" and rows[0].where.endswith("line 1")
        fps.append(stream.fingerprint)
    assert fps[0] == fps[1] != fps[2]
    pc = tmp_path / "pc.csv"
    pc.write_text("question,answer\nwho,me\n")
    stream = DocumentStream(pc, data_format="auto", prompt_field="question", completion_field="answer")
    assert [r.fields for r in stream] == [{"prompt": "who", "completion": "me"}]


THINKING = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")
BAD = {
    "unknown role": ([{"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}],
                     [], r"line 2: messages\[0\]: unknown role 'narrator'"),
    "empty conversation": ([{"messages": []}], [], r"line 2: `messages` is an empty conversation"),
    "missing completion": ([{"prompt": "who", "completion": ""}], [], r"line 2: `completion` is empty"),
    "template not split into turns": ([], ["thinking"], r"line 1: message \d: .*generation prompt is not where the "
                                      "assistant turn starts"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rows_exit_2_naming_the_row_and_leave_no_cache(case, root, llama_chat, tmp_path, capsys, reliability):
    rows, flags, message = BAD[case]
    model = llama_chat
    if flags == ["thinking"]:
        model = tmp_path / "model"
        shutil.copytree(llama_chat, model)
        tok = make_chat_tokenizer("smollm2")
        tok.chat_template = THINKING
        tok.save_pretrained(model)
    first = conversations(1, seed=5)[0] if "prompt" not in (rows[0] if rows else {}) else {"prompt": "a", "completion": "b"}
    data = write_rows(tmp_path / "bad.jsonl", [first, *rows])
    out = tmp_path / "out"
    assert main(["cache", "--model", str(model), "--data", str(data), "--out", str(out), "--seq-len", str(SEQ),
                 "--top-k", "4"]) == 2
    errors = [x for x in re.split(r"[\r\n]", capsys.readouterr().err) if "error:" in x]
    assert len(errors) == 1 and errors[0].startswith(f"mft cache: error: --data {data}: "), errors  # one line
    assert re.search(message, errors[0]), errors[0]
    assert not (out / "manifest.json").exists() and not any(out.glob("shard-*"))
    reliability("hostile input", f"chat data: {case}", "exit 2 naming the file and the row; no manifest, no shard")


# -- stage two --------------------------------------------------------------------------------------------------

def test_loss_over_trained_positions_equals_each_document_alone(llama_chat, chat_cache):
    """StudentLoss on packed cache rows (segment ids, label mask) gives the summed MFT loss of the dense reference
    run on each conversation alone, counts trained tokens only, and gives nothing to masked positions: garbage
    targets there change neither the loss nor any gradient."""
    from transformers import AutoModelForCausalLM

    cache = open_cache(chat_cache)
    rows = Rows(cache)
    batch = rows.batch(list(range(len(cache))))
    assert "segment_ids" in batch and torch.equal(batch["label_mask"], torch.from_numpy(
        np.concatenate([cache.read_rows(r, r + 1)["label_mask"] for r in range(len(cache))])))
    student = AutoModelForCausalLM.from_pretrained(llama_chat, dtype=torch.float32)
    student.get_output_embeddings().weight.data.mul_(0.5)  # not the teacher: the loss is not at its minimum
    targets = from_cache(batch, objective="mft", tau=0.25)
    module = StudentLoss(student, chunk_size=40)
    loss, n = module(input_ids=batch["input_ids"], length=batch["length"], label_mask=batch["label_mask"], **targets.tensors(),
                     segment_ids=batch["segment_ids"])
    assert int(n) == int(batch["label_mask"].sum()) == cache.manifest.num_tokens
    loss.backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad()

    garbage = batch["label_mask"][..., None]
    spoiled = {**batch, "topk_ids": torch.where(garbage, batch["topk_ids"], 7),
               "topk_logprobs": torch.where(garbage, batch["topk_logprobs"], -0.5),
               "label_logprob": torch.where(batch["label_mask"], batch["label_logprob"], -0.1)}
    loss2, _ = module(input_ids=batch["input_ids"], length=batch["length"], label_mask=batch["label_mask"],
                      **from_cache(spoiled, objective="mft", tau=0.25).tensors(), segment_ids=batch["segment_ids"])
    loss2.backward()
    assert loss2.item() == loss.item()
    assert all(torch.equal(grads[k], p.grad) for k, p in student.named_parameters())
    student.zero_grad()

    total = torch.zeros((), dtype=torch.float64)
    for r, s, n_tok in documents_of(cache):
        ids = batch["input_ids"][r, s:s + n_tok]
        logits = student(input_ids=ids[None], use_cache=False).logits[0, :-1]  # the conversation alone
        m = batch["label_mask"][r, s:s + n_tok - 1]
        t = from_cache({k: v[r:r + 1, s:s + n_tok - 1] if k != "input_ids" else ids[None] for k, v in batch.items()
                        if k in ("input_ids", "topk_ids", "topk_logprobs", "label_logprob")}, objective="mft", tau=0.25)
        total += sparse_mft_loss(logits, ids[1:], t.weight[0], m, t.topk_ids[0], t.logprobs[0],
                                 t.label_logprob[0]).sum().double()
    assert abs(loss.item() - total.item()) <= 1e-5 * abs(total.item())


def test_chat_evaluation_is_perplexity_over_the_assistant_tokens(llama_chat, chats):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    tok = make_chat_tokenizer("llama3")
    cfg = TrainConfig(eval_specialized=str(chats), cache="unused")
    sets = open_eval_sets(cfg, tok, SEQ)
    model = AutoModelForCausalLM.from_pretrained(llama_chat, dtype=torch.float32).eval()
    ppl, _ = evaluate_perplexity_se(StudentLoss(model, 64), sets["specialized"], 4, Accelerator(cpu=True))
    nll = n = 0.0
    for line in chats.read_text().splitlines():
        ids, trained = render(json.loads(line), tok, "chat")
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        at = torch.tensor(trained[1:])
        nll -= lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0][at].double().sum().item()
        n += int(at.sum())
    assert ppl == pytest.approx(float(np.exp(nll / n)), rel=1e-5)


def test_training_follows_the_cache_and_matches_the_online_teacher(root, llama_chat, chats, chat_cache, tmp_path):
    """k = vocabulary and float32: MFT from the chat cache and from the online teacher on the same conversations give
    the same losses, step by step (same rows, masks and attention)."""
    common = dict(steps=3, batch_size=2, lr=3e-3, warmup_steps=1, eval_every=100, save_every=0, log_every=100,
                  eval_specialized=str(chats))
    cached = train(TrainConfig(cache=str(chat_cache), out=str(tmp_path / "cached"), **common))
    online = train(TrainConfig(teacher="online", model=str(llama_chat), data=str(chats), seq_len=SEQ,
                               out=str(tmp_path / "online"), **common))

    def losses(run):
        return [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["type"] == "train"]

    torch.testing.assert_close(torch.tensor(losses("cached")), torch.tensor(losses("online")), rtol=1e-4, atol=0)
    assert cached["base_ppl_specialized"] == pytest.approx(online["base_ppl_specialized"], rel=1e-6)


def test_replay_of_a_text_cache_mixes_with_chat_rows(root, llama_chat, chat_cache, tmp_path):
    text = write_jsonl(root / "general.jsonl", make_texts(8, seed=4, max_words=30))
    replay = root / "replay-cache"
    if not (replay / "manifest.json").exists():
        build_cache(CacheConfig(model=str(llama_chat), data=str(text), out=str(replay), seq_len=SEQ, top_k=VOCAB,
                                logprob_dtype="float32"))
    summary = train(TrainConfig(cache=str(chat_cache), replay=str(replay), out=str(tmp_path / "run"), steps=2,
                                batch_size=4, lr=1e-3, warmup_steps=0, eval_every=100, save_every=0))
    assert summary["steps"] == 2 and summary["replay"] == str(replay)


def test_a_student_that_would_render_or_mask_otherwise_is_refused(llama_chat, chat_cache, tmp_path, capsys):
    other = tmp_path / "other-template"
    shutil.copytree(llama_chat, other)
    tok = make_chat_tokenizer("llama3")
    tok.chat_template = tok.chat_template.replace("message['content'] | trim", "message['content']")
    tok.save_pretrained(other)
    base = ["train", "--cache", str(chat_cache), "--steps", "1", "--eval-every", "100"]
    assert main([*base, "--model", str(other), "--out", str(tmp_path / "a")]) == 2
    assert "chat template differs" in capsys.readouterr().err
    assert main([*base, "--train-on", "all", "--out", str(tmp_path / "b")]) == 2
    assert "--train-on all: the cache" in capsys.readouterr().err
    assert main([*base, "--packing", "concat", "--out", str(tmp_path / "c")]) == 2
    assert "--packing concat: the cache" in capsys.readouterr().err
    other_chats = write_rows(tmp_path / "other.jsonl", conversations(3, seed=9))
    assert main([*base, "--data", str(other_chats), "--out", str(tmp_path / "d")]) == 2
    assert "is not the data the cache" in capsys.readouterr().err


def test_two_process_chat_cache_equals_the_one_process_cache(llama_chat, chats, chat_cache, tmp_path):
    """2 processes (torchrun, gloo) deal out the shards of a chat cache; every file but the manifest's process
    count is the one a single process writes (here: the module's cache, one row a shard)."""
    out = tmp_path / "two"
    args = cache_args(llama_chat, chats, out, seq_len=SEQ, top_k=VOCAB, logprob_dtype="float32", batch_size=3,
                      shard_mb=0.05)
    rc, err = torchrun(args, tmp_path / "run")
    assert rc == 0, err[-3000:]
    one, two = snapshot(chat_cache), snapshot(out)
    assert sorted(one) == sorted(two) and len([k for k in one if k.startswith("shard-")]) >= 3
    assert [k for k in one if k != "manifest.json" and one[k] != two[k]] == []
    m1, m2 = (json.loads((f / "manifest.json").read_text()) for f in (chat_cache, out))
    ignore = ("num_processes", "manifest_sha256")
    assert {k: v for k, v in m1.items() if k not in ignore} == {k: v for k, v in m2.items() if k not in ignore}
    assert m2["num_processes"] == 2 and m2["schema_version"] == 3
