"""The `mft` console script: `mft cache`, `mft inspect`, `mft train`, `mft plan`, `mft sweep`, `mft study`, `mft regime`."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from . import interrupts
from .config import (add_arguments, add_config_argument, config_defaults, from_namespace, read_config_file,
                     set_command_line)


# what `mft plan` (and `mft train --plan`) prints
PLAN_HELP = ("the estimated peak memory of this run (weights, gradients, optimiser, activations, loss, teacher), "
             "whether it fits, and what would make it fit")
# the section of a config file a command reads, where it is not the command's own: `mft plan` plans `mft train`'s run
CONFIG_SECTION = {"plan": "train"}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and the subcommands that take --config."""
    from mft_cache.pipeline.cache import CacheConfig

    p = argparse.ArgumentParser(prog="mft", description="Minifinetuning from a cached teacher.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("cache", help="stage one: the teacher reads the data once and writes the cache")
    add_arguments(c, CacheConfig)
    with_config = {"cache": c}

    i = sub.add_parser("inspect", help="summarise a cache (and verify its checksums)")
    i.add_argument("cache", help="cache folder, or hf://OWNER/NAME[@REVISION] (downloaded, every shard verified)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--verify", action="store_true", help="check every shard's checksum; exit non-zero naming a bad shard")

    try:
        from mft_cache.trainer.config import SweepConfig, TrainConfig
    except ImportError:  # stage two not installed in this build
        TrainConfig = None
    if TrainConfig is not None:
        t = sub.add_parser("train", help="stage two: minifinetune from the cache")
        t.add_argument("--plan", action="store_true", help=f"train nothing: print {PLAN_HELP}; writes nothing "
                       "(as `mft plan`)")
        t.add_argument("--plan-json", action="store_true", help="as --plan, printed as one JSON object")
        add_arguments(t, TrainConfig)
        pl = sub.add_parser("plan", help="the estimated peak memory of a `mft train` run, whether it fits, and "
                            "what would make it fit (trains nothing)",
                            description="Takes the options of `mft train`, trains nothing and writes nothing: "
                            f"prints {PLAN_HELP}. `mft train ... --plan` prints the same.")
        pl.add_argument("--json", "--plan-json", dest="plan_json", action="store_true",
                        help="print it as one JSON object (what `mft train --plan-json` prints)")
        add_arguments(pl, TrainConfig)
        s = sub.add_parser("sweep", help="a run per tau and ft, per learning rate and seed, from one cache")
        add_arguments(s, TrainConfig, SweepConfig)
        from mft_cache.study import StudyConfig

        st = sub.add_parser("study", help="the paper's compositions and ablations on one cache (writes STUDIES.md)")
        add_arguments(st, TrainConfig, StudyConfig)
        from mft_cache.regime import RegimeConfig

        rg = sub.add_parser("regime", help="the paper's regime: a reference checkpoint, many epochs over small data "
                            "budgets, FT and MFT over the same learning rates, several domains (writes STUDIES.md)")
        add_arguments(rg, TrainConfig, RegimeConfig)
        with_config.update(train=t, plan=pl, sweep=s, study=st, regime=rg)
    for command, parser in with_config.items():
        add_config_argument(parser, CONFIG_SECTION.get(command))
    return p, with_config


_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _resume_hint(command: str) -> str:
    """How to continue a stopped command: training needs --resume; the others pick up where they stopped."""
    if command == "train":
        return "run the same command with --resume (not --overwrite) to continue from the last checkpoint"
    return "run the same command again to resume"


def _config_ignored(command: str) -> tuple:
    """Keys a config file may hold that are no option: those a run's config.json records besides its options."""
    if command == "cache":
        return ()
    from mft_cache.trainer.config import RESOLVED_KEYS

    return RESOLVED_KEYS


def recorded_cache(path: str, command: str) -> str | None:
    """The cache_manifest_sha256 a run's config.json recorded, when `mft train --config` reads one (reproducing that
    run: another cache is refused unless --allow-changed-cache); None for any other file, or a run without a cache."""
    if command != "train":
        return None
    recorded = read_config_file(path, command).get("cache_manifest_sha256")
    if recorded is None:
        return None
    if not (isinstance(recorded, str) and len(recorded) == 64 and all(c in "0123456789abcdef" for c in recorded)):
        raise ValueError(f"--config {path}: cache_manifest_sha256 must be a sha256 (64 lowercase hex digits); got "
                         f"{str(recorded)[:80]!r}")
    return recorded


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; with --config FILE, the file's values are the defaults and the flags given win.
    A bad file exits 2 naming it (and the key). `recorded_cache`: what recorded_cache found in the file."""
    parser, with_config = _parser()
    args = parser.parse_args(argv)
    recorded = None
    if getattr(args, "config", None):
        sub = with_config[args.command]
        try:
            defaults = config_defaults(sub, args.config, args.command, _config_ignored(args.command),
                                       section=CONFIG_SECTION.get(args.command))
            recorded = recorded_cache(args.config, args.command)
        except ValueError as e:
            sub.error(str(e))  # exits 2
        if recorded is not None:  # --allow-changed-cache comes from this command line, never from the record
            defaults["allow_changed_cache"] = False
        sub.set_defaults(**defaults)
        args = parser.parse_args(argv)
    args.recorded_cache = recorded
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    set_command_line(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("MFT_LOG_LEVEL", "INFO"), format="%(message)s")
    # zarr writes through asyncio: when a write fails (a full disk), sibling tasks that failed too are reported by
    # asyncio as "exception was never retrieved", with a traceback, after our own one-line error; silence that echo
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    with interrupts.handled():  # SIGTERM stops a command as Ctrl-C does
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The command, with every expected failure mapped to its message and exit code (no tracebacks)."""
    from mft_cache.storage import CorruptShardError, ManifestError

    try:
        if args.command == "cache":
            from mft_cache.pipeline.cache import CacheConfig, build_cache

            build_cache(from_namespace(CacheConfig, args))
        elif args.command == "inspect":
            from mft_cache.pipeline.inspect import cache_stats, format_stats, stats_json

            stats = cache_stats(args.cache, verify=args.verify)
            print(stats_json(stats) if args.json else format_stats(stats))
        elif args.command == "plan" or (args.command == "train" and (args.plan or args.plan_json)):
            from mft_cache.trainer.config import TrainConfig
            from mft_cache.trainer.plan import format_plan, plan, plan_json

            p = plan(from_namespace(TrainConfig, args))
            print(plan_json(p) if args.plan_json else format_plan(p))
        elif args.command == "train":
            from mft_cache.trainer.config import TrainConfig
            from mft_cache.trainer.train import train

            train(from_namespace(TrainConfig, args), recorded_cache=args.recorded_cache)
        elif args.command == "sweep":
            from mft_cache.trainer.config import SweepConfig, TrainConfig
            from mft_cache.trainer.sweep import sweep

            sc = from_namespace(SweepConfig, args)
            sweep(from_namespace(TrainConfig, args), sc.tau_values(), with_ft=not sc.no_ft, seeds=sc.seed_values(),
                  lrs=sc.lr_values(), mft_lrs=sc.mft_lrs)
        elif args.command == "study":
            from mft_cache.study import StudyConfig, study
            from mft_cache.trainer.config import TrainConfig

            study(from_namespace(StudyConfig, args), from_namespace(TrainConfig, args))
        elif args.command == "regime":
            from mft_cache.regime import RegimeConfig, regime
            from mft_cache.trainer.config import TrainConfig

            regime(from_namespace(RegimeConfig, args), from_namespace(TrainConfig, args))
    except (CorruptShardError, ManifestError) as e:
        print(f"mft {args.command}: error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"mft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only folder, permissions: the OS's word, the file, and what to do
        where = f" ({e.filename})" if e.filename else ""
        print(f"mft {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        if e.errno in _WRITE_ERRORS:
            print(f"mft {args.command}: nothing half-written is marked complete; free space or fix the folder's "
                  f"permissions, then {_resume_hint(args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C (130) or SIGTERM (143): stopped at a safe point
        code, what = (143, "terminated (SIGTERM)") if isinstance(e, interrupts.Terminated) else (130, "interrupted")
        print(f"mft {args.command}: {what}; {_resume_hint(args.command)}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
