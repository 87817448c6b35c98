"""Names a user types that the tools pass on as names: a tracker's run name, a Hub repository id, a Hub revision.
Each is checked against a strict pattern before any work, so that none becomes a path (`../../x`, `/etc`), a
second line of a message, or a request the Hub would refuse after an hour of training."""
from __future__ import annotations

import re

# a Hub repository id, as the Hub accepts it (huggingface_hub's validate_repo_id), in ASCII: OWNER/NAME, each part
# of letters, digits, '-', '_' and '.', starting and ending with a letter, a digit or '_', at most 96 characters;
# no '--' or '..' anywhere, no '.git' at the end
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
MAX_REPO_PART = 96
REPO_ID_RULE = ("OWNER/NAME, each of letters, digits, '-', '_' and '.' (starting and ending with a letter or a digit, "
                "at most 96 characters, no '--' or '..')")

# a revision: a branch, a tag or a commit, named as git allows (check-ref-format), in ASCII: parts separated by single
# '/', each of letters, digits and '-', '_', '.', '+', '=', ',', not starting with '.' and not ending with '.' or
# '.lock'; no '..'; at most 128 characters
_REVISION_PART = re.compile(r"[A-Za-z0-9_+=,-][A-Za-z0-9_.+=,-]*")
MAX_REVISION = 128
REVISION_RULE = ("a branch, tag or commit: letters, digits and '-', '_', '.', '+', '=', ',' in parts separated by '/' "
                 "(not starting with '/' or '.', no '..', at most 128 characters)")

# a run name: a tracker's name for the run and the folder TensorBoard writes it to, under its logging folder
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=,-]*")
MAX_RUN_NAME = 200
RUN_NAME_RULE = ("letters, digits and '-', '_', '.', '+', '=', ',' (starting with a letter, a digit or '_', no '..', "
                 f"at most {MAX_RUN_NAME} characters)")


def shown(text: str, limit: int = 200) -> str:
    """A string a user typed, for a one-line message: as typed when printable and short, else its repr, cut."""
    text = str(text)
    if text.isprintable() and len(text) <= limit:
        return text
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def repo_id_problem(repo: str, owner_optional: bool = False) -> str | None:
    """What makes `repo` no Hub repository id (None: it is one). `owner_optional`: a bare NAME is one too (a model
    id such as `gpt2`)."""
    if not isinstance(repo, str) or not repo:
        return "it is empty"
    parts = repo.split("/")
    if not (len(parts) == 2 or (owner_optional and len(parts) == 1)):
        return "it is not OWNER/NAME" if not owner_optional else "it has more than one '/'"
    if any(len(p) > MAX_REPO_PART or not _REPO_PART.fullmatch(p) for p in parts):
        return "a part holds another character, starts or ends with '-' or '.', or is longer than 96 characters"
    if "--" in repo or ".." in repo:
        return "it holds '--' or '..'"
    if repo.endswith(".git"):
        return "it ends with '.git'"
    return None


def check_repo_id(repo: str, flag: str, owner_optional: bool = False) -> None:
    """Refuse a Hub repository id the Hub would refuse (or that could name a path), naming `flag`."""
    problem = repo_id_problem(repo, owner_optional)
    if problem is not None:
        raise ValueError(f"{flag} {shown(repo)}: not a Hub repository id ({problem}); expected {REPO_ID_RULE}")


def revision_problem(revision: str) -> str | None:
    """What makes `revision` no branch, tag or commit name (None: it is one)."""
    if not revision:
        return "it is empty"
    if len(revision) > MAX_REVISION:
        return f"it is longer than {MAX_REVISION} characters"
    if ".." in revision:
        return "it holds '..'"
    for part in revision.split("/"):
        if not _REVISION_PART.fullmatch(part) or part.endswith((".", ".lock")):
            return "it starts or ends with '/', or a part is empty, holds another character, or starts or ends with '.'"
    return None


def check_run_name(name: str, flag: str = "--run-name") -> None:
    """Refuse a run name that is not a plain name (a path, a control character, '..'), naming `flag`."""
    ok = (isinstance(name, str) and len(name) <= MAX_RUN_NAME and _RUN_NAME.fullmatch(name) is not None
          and ".." not in name)
    if not ok:
        raise ValueError(f"{flag} {shown(name)}: a run name is {RUN_NAME_RULE}")


def safe_run_name(text: str, default: str = "run") -> str:
    """A run name made from any text (a folder's name): each run of other characters becomes '-', '..' becomes '.',
    what it starts or ends with other than a letter, a digit or '_' is dropped, and it is cut to MAX_RUN_NAME;
    `default` when nothing is left."""
    name = re.sub(r"[^A-Za-z0-9_.+=,-]+", "-", str(text))
    name = re.sub(r"\.{2,}", ".", name)
    name = re.sub(r"^[^A-Za-z0-9_]+|[^A-Za-z0-9_]+$", "", name)[:MAX_RUN_NAME]
    return name or default


def lr_tag(lr: float) -> str:
    """1e-4 -> "1e-4", 2.5e-4 -> "2.5e-4": short and exact enough for a folder name."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
