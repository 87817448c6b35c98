"""Strings a user types that the tools pass on as names: a run name (TensorBoard's folder under --out), a Hub
repository id (--push-to-hub, --model), a Hub cache and its revision (--cache / --replay hf://OWNER/NAME@REVISION),
and what a model card shows of them. A name that is a path (`../../x`, `/etc`), holds a control character or is
longer than the Hub allows is refused with exit 2 naming the flag, before any work; a card escapes or fences every
string, and shows a local model folder by its name, never by its path."""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from helpers import tiny_flags
from mft_cache.cli import main


@pytest.fixture(scope="module")
def cache(text_cache) -> Path:
    return text_cache  # read only: one build serves every file


def _no_model_loads(monkeypatch) -> None:
    """Any model or model config loaded from here on fails the test: a refusal must come before."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("mft_cache.trainer.train.load_model", boom)
    monkeypatch.setattr("mft_cache.trainer.inputs.load_config", boom)
    monkeypatch.setattr("mft_cache.pipeline.cache.load_config", boom)


# -- run names: TensorBoard writes to --out/tensorboard/<run name>/ -----------------------------------------------
RUN_NAMES = ["../../x", "/tmp/abs-run", "a/b", "..", ".hidden", "-x", "x\ny", "x" * 201, "x..y", "tab\tname"]


@pytest.mark.parametrize("name", RUN_NAMES)
def test_a_run_name_that_is_no_plain_name_is_refused(name, cache, docs_jsonl, tmp_path, capsys, monkeypatch,
                                                     reliability):
    _no_model_loads(monkeypatch)
    out = tmp_path / "run"
    code = main(["train", *tiny_flags(cache, docs_jsonl, out), "--report-to", "tensorboard", f"--run-name={name}"])
    err = capsys.readouterr().err
    assert code == 2 and "--run-name" in err and "a run name is" in err and "Traceback" not in err, err
    assert "\n" not in err.strip()  # one line: a control character in the name is shown escaped
    assert not out.exists() and not (tmp_path / "x").exists() and not Path("/tmp/abs-run").exists()
    reliability("security", f"`mft train --report-to tensorboard --run-name {name!r}`",
                "exit 2 naming `--run-name` (letters, digits, `-_.+=,`, no `..`); nothing written, no event file "
                "outside --out")


def test_a_sweep_refuses_a_run_name_that_is_a_path(cache, docs_jsonl, tmp_path, capsys, reliability):
    out = tmp_path / "sw"
    assert main(["sweep", *tiny_flags(cache, docs_jsonl, out), "--taus", "0.25", "--no-ft", "--run-name", "../x"]) == 2
    assert "--run-name ../x" in capsys.readouterr().err and not out.exists() and not (tmp_path / "x").exists()
    reliability("security", "`mft sweep --run-name ../x` (the sweep's tracker project and run prefix)",
                "exit 2 naming `--run-name`; nothing written")


def test_the_tracking_api_refuses_a_path_and_makes_a_name_of_a_folder(tmp_path, reliability):
    from mft_cache.trainer.tracking import tracking_of

    with pytest.raises(ValueError, match="--run-name"):
        tracking_of(tmp_path / "out", "../../x")
    assert tracking_of(Path("/runs/my run `1` <b>"), "").run_name == "my-run-1-b"  # the default: --out's name
    assert tracking_of(Path("/runs/r"), "", tmp_path / "tb").logging_dir == tmp_path / "tb"
    reliability("security", "`tracking_of` (the API) given `../../x`, or an --out folder named with spaces and "
                "Markdown", "ValueError naming `--run-name`; the folder's name made a plain run name")


# -- Hub repository ids: --push-to-hub (mft train, mft cache), --model ---------------------------------------------
BAD_REPOS = ["../x", "a/b/c", "noowner", "/etc/passwd", "a--b/c", "a/b..c", "a/.b", "a/b-", "a/b.git", "a/b\n",
             "a/" + "b" * 97, "a/b c", "a\\b/c", "a/\u00e9"]


@pytest.mark.parametrize("repo", BAD_REPOS)
def test_push_to_hub_refuses_a_repo_id_the_hub_would_refuse_before_any_work(repo, cache, llama, docs_jsonl, tmp_path,
                                                                             capsys, monkeypatch, reliability):
    _no_model_loads(monkeypatch)
    for argv, out in ((["train", *tiny_flags(cache, docs_jsonl, tmp_path / "t")], tmp_path / "t"),
                      (["cache", "--model", str(llama), "--data", str(docs_jsonl), "--out", str(tmp_path / "c"),
                        "--seq-len", "32"], tmp_path / "c")):
        assert main([*argv, "--push-to-hub", repo]) == 2
        err = capsys.readouterr().err
        assert "--push-to-hub" in err and "not a Hub repository id" in err and "OWNER/NAME" in err, err
        assert "Traceback" not in err and not out.exists()
    reliability("hostile input", f"`mft train` / `mft cache --push-to-hub {repo!r}`",
                "exit 2 naming `--push-to-hub` and the Hub's rule for OWNER/NAME, before any model loads")


@pytest.mark.parametrize("model", ["a b", "x\ny", "a--b", "owner/na$me", "a/b.git"])
def test_a_model_that_is_neither_a_folder_nor_a_hub_id_is_refused(model, docs_jsonl, tmp_path, capsys, reliability):
    for argv in (["train", "--teacher", "online", "--data", str(docs_jsonl), "--seq-len", "16", "--objective", "ft",
                  "--out", str(tmp_path / "t")],
                 ["cache", "--data", str(docs_jsonl), "--out", str(tmp_path / "c"), "--seq-len", "16"]):
        assert main([*argv, "--model", model]) == 2
        err = capsys.readouterr().err
        assert "--model" in err and "neither a local folder nor a Hub model id" in err and "Traceback" not in err, err
    assert not (tmp_path / "t").exists() and not (tmp_path / "c").exists()
    reliability("hostile input", f"`--model {model!r}` (no such folder, and no Hub id)",
                "exit 2 naming `--model`: neither a local folder nor a Hub model id; nothing asked of the Hub")


# -- Hub caches: hf://OWNER/NAME[@REVISION] for --cache and --replay ------------------------------------------------
BAD_REFS = ["hf://a/b@../../x", "hf://a/b@/etc", "hf://a/b@/dev/stdin", "hf://a/b@refs/../../x", "hf://a/b@x\ny",
            "hf://a/b@", "hf://a/b@v1.lock", "hf://a/b@" + "v" * 129, "hf://a/b@a//b", "hf://a/b@v1\x00",
            "hf://../b", "hf://a/b/c", "hf://a/..", "hf://a/b\x1b[2J", "hf:///etc/passwd"]


@pytest.mark.parametrize("flag", ["--cache", "--replay"])
@pytest.mark.parametrize("ref", BAD_REFS)
def test_a_hub_cache_with_a_path_for_a_name_or_revision_is_refused(flag, ref, cache, docs_jsonl, tmp_path, capsys,
                                                                   monkeypatch, reliability):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append((a, k)) or str(cache))
    out = tmp_path / "run"
    argv = (["train", "--cache", ref, "--out", str(out)] if flag == "--cache"
            else ["train", *tiny_flags(cache, docs_jsonl, out), "--replay", ref])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flag} " in err and "a Hub cache is hf://OWNER/NAME" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err  # a control character is shown escaped, not printed
    assert calls == [] and not out.exists()
    reliability("security", f"`mft train {flag} {ref!r}`", f"exit 2 naming `{flag}` and what a Hub cache and a "
                "revision are; nothing asked of the Hub, nothing written")


def test_hub_refs_the_hub_accepts_are_read_as_before():
    from mft_cache.storage.hub import parse_hub_ref

    assert parse_hub_ref("hf://me/cache", "--cache") == ("me/cache", None)
    assert parse_hub_ref("hf://me/cache@v1.0", "--cache") == ("me/cache", "v1.0")
    assert parse_hub_ref("hf://Org_1/c.d-e@refs/pr/12", "--cache") == ("Org_1/c.d-e", "refs/pr/12")
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert parse_hub_ref(f"hf://me/cache@{sha}", "--replay") == ("me/cache", sha)


# -- model cards: user strings escaped or fenced; local models by their folder name ---------------------------------
_FENCE = re.compile(r"^ {0,3}(`{3,})[^`]*$")


def outside_fences(text: str) -> list[str]:
    """The lines of Markdown `text` outside fenced code blocks, as CommonMark reads fences: a block opened by a run
    of n >= 3 backticks ends only at a line of n or more backticks (and spaces) alone."""
    lines, fence = [], 0
    for line in text.splitlines():
        if fence:
            if re.fullmatch(r" {0,3}`{%d,} *" % fence, line):
                fence = 0
            continue
        m = _FENCE.match(line)
        if m:
            fence = len(m.group(1))
        else:
            lines.append(line)
    return lines


def test_a_model_card_escapes_what_users_typed_and_hides_local_paths(cache, llama, docs_jsonl, tmp_path,
                                                                     reliability):
    from huggingface_hub import ModelCard

    hostile = tmp_path / "e\n```\n# pwned <img src=x>\n```\n`.jsonl"  # a file name may hold all of that
    shutil.copy(docs_jsonl, hostile)
    run = tmp_path / "card *x* ``` <b>"
    flags = tiny_flags(cache, docs_jsonl, run)
    flags[flags.index("--eval-specialized") + 1] = str(hostile)
    flags[flags.index("--steps") + 1] = "1"
    assert main(["train", *flags, "--model", str(llama)]) == 0
    for folder in ("best", "final"):
        text = (run / folder / "README.md").read_text()
        card = ModelCard.load(run / folder / "README.md")
        plain = outside_fences(card.text)  # the Markdown after the YAML metadata
        assert not [line for line in plain if "pwned" in line and not line.startswith("- evaluation")], plain
        assert sorted(line for line in plain if line.startswith("#")) == sorted(
            ["# card \\*x\\* \\`\\`\\` \\<b\\>/" + folder, "## Evaluation (step 1)", "## Training data",
             "## Reproduce"]), plain
        m = card.data.to_dict()["mft"]
        assert m["command"] in text  # whole, inside its fence
        assert shlex.split(m["command"])[shlex.split(m["command"]).index("--model") + 1] == "llama"
        assert m["teacher"] == "llama" and "`llama`" in text
        assert str(llama) not in text and str(llama.parent) not in text  # no local path of a model
    reliability("security", "model card of a run whose --eval-specialized file name holds a newline, ``` and "
                "`# heading`, whose --out name holds Markdown, with --model an absolute folder",
                "the command and config in fences longer than any backtick run, names escaped: no heading added, no "
                "fence closed; the model shown as `llama`, its path nowhere in the card")
