"""Every parser of outside input, against inputs hypothesis makes: a config file (--config), a cache's manifest, a
data file (.jsonl, .json, .txt, .csv), chat rows, a Hub reference. Each input either parses to a valid value or is
refused with the project's own error (ValueError, ManifestError, DocumentError), never another exception, a hang or
a recursion error. Bounded: a few dozen examples each, a deadline per example, no example database written."""
from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mft_cache.rows.chat import ROW_FORMATS, render, validate_row
from mft_cache.rows.documents import ChatRow, DocumentError, DocumentStream
from mft_cache.storage import ManifestError
from mft_cache.storage.manifest import Manifest, load_manifest

PROPERTY = settings(max_examples=60, deadline=800, database=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values as a parser may meet them: NaN and the infinities too (Python's json reads them), deep-ish nesting
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
           | st.sampled_from(["", "0", "-1", "1e400", "true", "null", "user", "assistant", "text", "messages"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)


# -- config files ------------------------------------------------------------------------------------------------
OPTION_NAMES = ["steps", "lr", "tau", "taus", "seeds", "lrs", "objective", "resume", "peft_targets", "out", "parts",
                "seq_len", "train", "sweep", "cache", "study", "no_ft", "top_k"]
NUMBERS = st.integers(-2, 300) | st.floats(-1, 2) | st.sampled_from([0.5, 1e-4, "3e-4", "x"])
# a section per command, each key an option of that command, with values near and outside its range
SECTIONS = st.fixed_dictionaries({}, optional={
    "cache": st.fixed_dictionaries({}, optional={k: NUMBERS for k in ("seq_len", "top_k", "batch_size")}),
    "train": st.fixed_dictionaries({}, optional={**{k: NUMBERS for k in ("steps", "lr", "tau", "seed")},
                                                 "objective": st.sampled_from(["ft", "mft", "sft"])}),
    "sweep": st.fixed_dictionaries({}, optional={"taus": st.lists(NUMBERS, max_size=3) | NUMBERS,
                                                 "seeds": st.lists(NUMBERS, max_size=3), "no_ft": st.booleans()}),
    "study": st.fixed_dictionaries({}, optional={"parts": st.sampled_from(["ab", "z", ""]),
                                                 "replay_documents": NUMBERS}),
})
CONFIGS = SECTIONS | st.dictionaries(st.sampled_from(OPTION_NAMES) | st.text(max_size=6), JSON, max_size=5)


def _config_classes(command: str) -> tuple:
    from mft_cache.pipeline.cache import CacheConfig
    from mft_cache.study import StudyConfig
    from mft_cache.trainer.config import SweepConfig, TrainConfig

    return {"cache": (CacheConfig,), "train": (TrainConfig,), "sweep": (TrainConfig, SweepConfig),
            "study": (TrainConfig, StudyConfig)}[command]


@pytest.fixture(scope="module")
def commands():
    """The command line built once (its first build imports both stages: longer than an example's deadline)."""
    from mft_cache.cli import _parser

    return _parser()


@PROPERTY
@given(config=CONFIGS, kind=st.sampled_from(["yaml", "json", "text"]), noise=st.text(max_size=40),
       command=st.sampled_from(["cache", "train", "sweep", "study"]))
def test_a_config_file_gives_a_config_or_exits_2_naming_it(commands, tmp_path_factory, config, kind, noise, command):
    from mft_cache.cli import parse
    from mft_cache.config import from_namespace

    path = tmp_path_factory.mktemp("config") / ("c.json" if kind == "json" else "c.yaml")
    text = yaml.safe_dump(config) if kind == "yaml" else json.dumps(config) if kind == "json" else noise
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # noise may hold a lone surrogate: not UTF-8
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parse([command, "--config", str(path)])
    except SystemExit as e:  # argparse's error(): the message after the usage
        message = err.getvalue().partition(" error: ")[2]
        assert e.code == 2 and str(path) in message and len(message) < 1000, err.getvalue()
        return
    for cls in _config_classes(command):  # the values as the options' own: the config's checks take them
        try:
            from_namespace(cls, args)
        except ValueError:
            pass


# -- manifests -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest_json(text_cache) -> dict:
    return json.loads((text_cache / "manifest.json").read_text())


def _mutated(data, obj):
    """`obj` with 1 to 3 changes at places drawn: a value replaced, a key removed, a key added."""
    obj = copy.deepcopy(obj)
    for _ in range(data.draw(st.integers(1, 3))):
        parent, key, node = None, None, obj
        while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
            parent, key = node, data.draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
            node = node[key]
        op = data.draw(st.sampled_from(["replace", "remove", "add"]))
        if op == "add" and isinstance(node, dict):
            node[data.draw(st.text(max_size=8))] = data.draw(JSON)
        elif op == "remove" and parent is not None:
            del parent[key]
        elif parent is not None:
            parent[key] = data.draw(JSON | st.integers(-3, 3) | st.sampled_from([2**63, -2**63 - 1, 1e308]))
    return obj


@PROPERTY
@given(data=st.data())
def test_a_manifest_parses_or_raises_manifest_error(manifest_json, tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "manifest.json"
    obj = _mutated(data, manifest_json)
    try:
        manifest = Manifest.from_json(obj, path)
    except ManifestError as e:
        assert str(path) in str(e), str(e)
        return
    assert isinstance(manifest, Manifest) and manifest.num_sequences >= 0 and manifest.top_k <= manifest.vocab_size


@PROPERTY
@given(raw=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_a_manifest_file_of_any_bytes_is_refused_with_manifest_error(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("cache")
    (folder / "manifest.json").write_bytes(raw)
    with pytest.raises(ManifestError):
        load_manifest(folder)


# -- data files ----------------------------------------------------------------------------------------------------
def _lines(values) -> bytes:
    return "".join(json.dumps(v) + "\n" for v in values).encode()


VALID_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                       "content": st.text(max_size=20)})
MESSAGE = VALID_MESSAGE | st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "bot"]) | SCALARS,
                                                             "content": JSON})
CONVERSATION = st.lists(VALID_MESSAGE, min_size=1, max_size=6) | st.lists(MESSAGE, max_size=6) | JSON
# rows of each format, most of them well formed, and anything else
ROWS = st.lists(st.fixed_dictionaries({"text": st.text(min_size=1, max_size=30)})
                | st.fixed_dictionaries({"messages": CONVERSATION})
                | st.fixed_dictionaries({"prompt": st.text(max_size=20), "completion": st.text(max_size=20)})
                | st.fixed_dictionaries({}, optional={"text": JSON, "messages": JSON, "prompt": JSON,
                                                     "completion": JSON}) | JSON, max_size=4)
CSV = st.lists(st.lists(st.text(max_size=10), min_size=1, max_size=3), max_size=4).map(
    lambda rows: "".join(",".join(json.dumps(c) for c in r) + "\n" for r in rows).encode("utf-8", "surrogatepass"))
DATA_FILES = st.one_of(
    st.tuples(st.just(".jsonl"), ROWS.map(_lines) | st.binary(max_size=120)),
    st.tuples(st.just(".json"), ROWS.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=120)),
    st.tuples(st.just(".txt"), st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass"))
              | st.binary(max_size=120)),
    st.tuples(st.just(".csv"), st.tuples(st.sampled_from(["text", "prompt,completion", "a,b", ""]), CSV).map(
        lambda hc: (hc[0] + "\n").encode() + hc[1] if hc[0] else hc[1]) | st.binary(max_size=120)),
)


@PROPERTY
@given(file=DATA_FILES, fmt=st.sampled_from(["auto", "text", "chat", "prompt-completion"]))
@example(file=(".csv", b""), fmt="auto")  # no header row: read as text, which has no column
@example(file=(".csv", b"a,b\n1,2\n"), fmt="auto")  # a header without the text column
def test_a_data_file_of_any_bytes_gives_documents_or_a_document_error(tmp_path_factory, file, fmt):
    suffix, raw = file
    path = tmp_path_factory.mktemp("data") / f"d{suffix}"
    path.write_bytes(raw)
    stream = DocumentStream(path, data_format=fmt)
    try:
        items = list(stream)
    except DocumentError as e:
        assert str(path) in str(e), str(e)
        return
    assert items and stream.num_documents == len(items)
    for item in items:
        if isinstance(item, ChatRow):
            assert stream.format in ("chat", "prompt-completion") and str(path) in item.where
            try:
                validate_row(item.fields, stream.format, item.where)
            except DocumentError as e:
                assert str(e).startswith(item.where), str(e)
        else:
            assert isinstance(item, str) and item.strip() and stream.format in ("auto", "text")


# -- chat rows ------------------------------------------------------------------------------------------------------
CHAT_ROWS = st.one_of(
    st.tuples(st.fixed_dictionaries({"messages": CONVERSATION}), st.just("chat")),
    st.tuples(st.fixed_dictionaries({"prompt": st.lists(VALID_MESSAGE, min_size=1, max_size=3),
                                     "completion": st.lists(VALID_MESSAGE, min_size=1, max_size=2)}),
              st.just("prompt-completion")),
    st.tuples(st.fixed_dictionaries({"prompt": CONVERSATION | st.text(max_size=20),
                                     "completion": CONVERSATION | st.text(max_size=20)}),
              st.just("prompt-completion")),
    st.tuples(st.fixed_dictionaries({"text": st.text(max_size=40) | JSON}), st.just("text")),
    st.tuples(JSON, st.sampled_from(ROW_FORMATS)),
)


@pytest.fixture(scope="module")
def chat_tokenizer():
    from mft_cache.testing import make_chat_tokenizer

    return make_chat_tokenizer("smollm2")


@PROPERTY
@given(row_fmt=CHAT_ROWS, train_on=st.sampled_from(["completion", "all"]), method=st.sampled_from(["auto", "turns"]),
       max_tokens=st.none() | st.integers(2, 200))
def test_a_chat_row_renders_or_raises_a_document_error(chat_tokenizer, row_fmt, train_on, method, max_tokens):
    row, fmt = row_fmt
    where = "--data rows.jsonl: line 3"
    try:
        ids, trained = render(row, chat_tokenizer, fmt, train_on, where=where, method=method, max_tokens=max_tokens)
    except DocumentError as e:
        assert str(e).startswith(where) or "must be one of" in str(e), str(e)
        return
    assert len(ids) == len(trained) and ids and not trained[0]
    assert all(isinstance(t, int) and 0 <= t < len(chat_tokenizer) for t in ids)
    assert max_tokens is None or len(ids) <= max_tokens
    assert train_on == "all" or any(trained)


# -- Hub references ------------------------------------------------------------------------------------------------
@PROPERTY
@given(body=st.text(max_size=40) | st.from_regex(r"[a-z]{1,5}/[a-z]{1,5}(@[a-z0-9.]{0,6})?", fullmatch=True))
def test_a_hub_reference_parses_or_raises_value_error(body):
    from mft_cache.storage.hub import parse_hub_ref

    ref = "hf://" + body
    try:
        repo, revision = parse_hub_ref(ref, "--cache")
    except ValueError as e:
        assert "--cache" in str(e), str(e)
        return
    assert isinstance(repo, str) and repo and (revision is None or isinstance(revision, str))


def test_the_unchanged_inputs_parse(manifest_json, tmp_path_factory):
    """What the strategies start from is valid: a property's inputs are not all refused for one shared fault."""
    from mft_cache.storage.hub import parse_hub_ref

    manifest = Manifest.from_json(copy.deepcopy(manifest_json), tmp_path_factory.getbasetemp() / "manifest.json")
    assert manifest.to_json() == manifest_json
    assert parse_hub_ref("hf://owner/name@main", "--cache") == ("owner/name", "main")
