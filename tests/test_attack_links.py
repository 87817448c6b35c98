"""Links, FIFOs and devices planted in the folders mft writes (a run folder, a sweep's or study's, the lock of any of
them): nothing is ever written through a link, nothing waits on a FIFO. A name a run writes that holds one is
refused with a message naming it (or, for the lock file and whole files written atomically, the planted name itself
is replaced); the file a link points at is never changed.

Unit cases on mft_cache.files; end to end on a tiny llama (SMALL_RUN on run_cache, conftest.py)."""
from __future__ import annotations

import json
import os
import stat

import pytest

from helpers import LOCK_FILE, MARKER, SMALL_RUN, deadline, snapshot, train_args
from mft_cache.cli import main
from mft_cache.files import (NotARegularFile, claim_folder, open_owned, read_json_object, write_bytes_atomic,
                             write_json_atomic, write_text_atomic)
from mft_cache.folder_lock import FolderLock

OUTSIDE = "a file of the user's, outside every folder mft writes\n"


def plant(path, kind: str, target) -> None:
    """A symbolic link to `target`, or a FIFO, at `path` (whatever was there removed first)."""
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if kind == "link":
        path.symlink_to(target)
    else:
        os.mkfifo(path)


@pytest.fixture
def outside(tmp_path):
    path = tmp_path / "important.txt"
    path.write_text(OUTSIDE)
    return path


# -- mft_cache.files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["r", "rb", "r+b", "a", "ab", "w", "wb"])
@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_open_owned_refuses_a_link_or_fifo_without_following_or_waiting(kind, mode, tmp_path, outside):
    plant(tmp_path / "metrics.jsonl", kind, outside)
    with deadline(), pytest.raises(NotARegularFile, match="metrics.jsonl is a (symbolic link|FIFO)") as e:
        open_owned(tmp_path, "metrics.jsonl", mode)
    assert isinstance(e.value, ValueError) and outside.read_text() == OUTSIDE


def test_open_owned_refuses_a_device_and_a_folder(tmp_path):
    (tmp_path / "best").mkdir()
    with pytest.raises(NotARegularFile, match="is a folder"):
        open_owned(tmp_path, "best", "a")
    try:
        os.mknod(tmp_path / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        return  # not root: no device can be made here (the FIFO cases stand for it)
    with deadline(), pytest.raises(NotARegularFile, match="zero is a device"):
        open_owned(tmp_path, "zero", "rb")


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc/passwd", "x\0y"])
def test_open_owned_takes_names_never_paths(name, tmp_path):
    with pytest.raises(ValueError, match="is not a file name"):
        open_owned(tmp_path, name, "a")
    assert list(tmp_path.iterdir()) == []


def test_open_owned_modes_create_append_empty_and_refuse_a_taken_name(tmp_path):
    with open_owned(tmp_path, "m.jsonl", "a") as f:
        f.write("one\n")
    with open_owned(tmp_path, "m.jsonl", "a") as f:
        f.write("two\n")
    assert (tmp_path / "m.jsonl").read_text() == "one\ntwo\n"
    with open_owned(tmp_path, "m.jsonl", "w") as f:
        f.write("three\n")
    assert (tmp_path / "m.jsonl").read_text() == "three\n"
    with pytest.raises(FileExistsError):
        open_owned(tmp_path, "m.jsonl", "x")
    with pytest.raises(FileNotFoundError):
        open_owned(tmp_path, "missing", "r")


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_an_atomic_write_replaces_a_planted_name_never_writes_through_it(kind, tmp_path, outside, reliability):
    for write, name, value in ((write_json_atomic, "config.json", {"a": 1}), (write_text_atomic, "sweep.md", "t"),
                               (write_bytes_atomic, "dg_vs_s.png", b"png")):
        path = tmp_path / name
        plant(path, kind, outside)
        with deadline():
            write(path, value)
        assert not path.is_symlink() and stat.S_ISREG(path.lstat().st_mode) and outside.read_text() == OUTSIDE
    # the temporary name is predictable (.NAME.tmp-PID): a link planted there is removed, not written through
    tmp = tmp_path / f".summary.json.tmp-{os.getpid()}"
    plant(tmp, kind, outside)
    with deadline():
        write_json_atomic(tmp_path / "summary.json", {"b": 2})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"b": 2} and not os.path.lexists(tmp)
    assert outside.read_text() == OUTSIDE
    reliability("security", f"a {'symbolic link' if kind == 'link' else 'FIFO'} planted at a file mft writes whole "
                "(config.json, summary.json, sweep.md, a plot) or at its temporary name `.NAME.tmp-PID`",
                "the planted name replaced (temp file created O_EXCL|O_NOFOLLOW, then renamed); the linked file "
                "unchanged; no wait on a FIFO")


def test_read_json_object_reads_no_link_and_no_fifo(tmp_path, outside):
    outside.write_text('{"runs": [], "configs": []}')
    for kind in ("link", "fifo"):
        plant(tmp_path / "sweep.json", kind, outside)
        with deadline():
            assert read_json_object(tmp_path / "sweep.json", 1 << 20) is None


# -- the lock -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_a_link_or_fifo_at_the_lock_is_replaced_never_written_through(kind, tmp_path, outside, reliability):
    folder = tmp_path / "run"
    folder.mkdir()
    plant(folder / LOCK_FILE, kind, outside)
    with deadline():
        lock = FolderLock.acquire(folder)
    try:
        assert stat.S_ISREG((folder / LOCK_FILE).lstat().st_mode)
        assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n" and outside.read_text() == OUTSIDE
    finally:
        lock.release()
    assert not os.path.lexists(folder / LOCK_FILE)
    (folder / LOCK_FILE).mkdir()
    with pytest.raises(ValueError, match=f"{LOCK_FILE} is a folder"):
        FolderLock.acquire(folder)
    reliability("security", f"a {'symbolic link to a file of the user' if kind == 'link' else 'FIFO'}'s planted at "
                "`.mft-lock`", "the planted name removed and a lock file made in its place; the linked file "
                "unchanged (not truncated); a folder there refused")


def test_train_with_a_link_at_the_lock_leaves_the_linked_file_alone(run_cache, tmp_path, outside, reliability):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(outside)  # ln -s ~/important.txt run/.mft-lock; mft train --out run
    assert main(train_args(run_cache, out, "--steps", "2", "--save-every", "0", **SMALL_RUN)) == 0
    assert outside.read_text() == OUTSIDE and not os.path.lexists(out / LOCK_FILE)
    assert (out / "summary.json").is_file()
    reliability("security", "`ln -s ~/important.txt run/.mft-lock; mft train --out run`",
                "the run finishes; important.txt unchanged (the link removed, never written through)")


# -- a run folder ---------------------------------------------------------------------------------------------------
RUN_NAMES = ["metrics.jsonl", "config.json", "summary.json", MARKER, "s_dg.png", "checkpoints", "best"]


@pytest.mark.parametrize("kind", ["link", "fifo"])
@pytest.mark.parametrize("name", RUN_NAMES)
def test_resume_refuses_a_link_or_fifo_at_a_name_a_run_writes(name, kind, run_cache, stopped_run, outside, capsys,
                                                              reliability):
    elsewhere = outside.parent / "elsewhere"  # a folder of the user's, for the names that are folders
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text(OUTSIDE)
    plant(stopped_run / name, kind, elsewhere if name in ("checkpoints", "best") else outside)
    with deadline():
        code = main(train_args(run_cache, stopped_run, "--resume", **SMALL_RUN))
    err = capsys.readouterr().err
    what = "a symbolic link" if kind == "link" else "a FIFO"
    assert code == 2 and f"{stopped_run / name} is {what}" in err and "Traceback" not in err, err
    assert outside.read_text() == OUTSIDE and snapshot(elsewhere) == {"notes.txt": OUTSIDE.encode()}
    assert os.path.lexists(stopped_run / name) and not os.path.lexists(stopped_run / LOCK_FILE)
    if name == "metrics.jsonl":
        reliability("security", f"{what} at `metrics.jsonl` of a stopped run (to a file of the user's), then "
                    "`mft train --resume`", "refused (exit 2) naming metrics.jsonl before anything is opened; the "
                    "linked file unchanged (not truncated or appended to), no wait on a FIFO")
    elif name == "config.json":
        reliability("security", f"{what} at a run's `config.json`, `summary.json`, `.mft-run.json`, `s_dg.png`, "
                    "`best/` or `checkpoints/`, then `mft train --resume`", "refused (exit 2) naming the file; "
                    "nothing read or written through it, no wait on a FIFO")


@pytest.mark.parametrize("kind", ["link", "fifo"])
@pytest.mark.parametrize("name", ["config.json", "summary.json", "metrics.jsonl"])
def test_a_fresh_run_refuses_a_link_or_fifo_planted_in_its_empty_folder(name, kind, run_cache, tmp_path, outside,
                                                                        capsys):
    out = tmp_path / "run"
    out.mkdir()
    plant(out / name, kind, outside)
    for extra in ((), ("--overwrite",)):
        with deadline():
            code = main(train_args(run_cache, out, *extra, **SMALL_RUN))
        err = capsys.readouterr().err
        assert code == 2 and f"{out / name} is a" in err and "Traceback" not in err, err
        assert outside.read_text() == OUTSIDE and sorted(p.name for p in out.iterdir()) == [name]


# -- a sweep's or a study's folder ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_a_sweep_or_study_folder_with_a_planted_name_is_refused(kind, tmp_path, outside, reliability):
    from mft_cache.study import is_study_name, written_by_a_study
    from mft_cache.trainer.sweep import is_sweep_name, written_by_a_sweep

    for what, name, ours, proof in (("sweep", "dg_vs_s.png", is_sweep_name, written_by_a_sweep),
                                    ("sweep", "tensorboard", is_sweep_name, written_by_a_sweep),
                                    ("study", "runs", is_study_name, written_by_a_study)):
        out = tmp_path / f"{what}-{name}"
        out.mkdir()
        claim_folder(out, what, ours, proof).release()  # marked as the command's own
        plant(out / name, kind, outside if name.endswith(".png") else tmp_path)
        before = sorted(p.name for p in out.iterdir())
        with deadline(), pytest.raises(NotARegularFile, match=f"{name} is a"):
            claim_folder(out, what, ours, proof)
        assert sorted(p.name for p in out.iterdir()) == before and outside.read_text() == OUTSIDE
    reliability("security", f"a {'symbolic link' if kind == 'link' else 'FIFO'} planted at a name `mft sweep` or "
                "`mft study` writes in its own folder (a plot, tensorboard/, runs/)", "refused before any run, "
                "naming it; nothing written through it")
