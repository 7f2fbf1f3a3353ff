"""The `mfim` command. Each subcommand lives in mfim/commands/<name>.py with `register(subparsers)`; heavy imports
happen inside the command's run function so `mfim --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "mfim.commands.assets",
    "mfim.commands.align",
    "mfim.commands.analyze",
    "mfim.commands.generate",
    "mfim.commands.swap",
    "mfim.commands.detect",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfim", description="MFIM face swapping and ID mixing")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # command not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mfim.runtime import ensure_allocator_env

    if argv is None:
        ensure_allocator_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from mfim.assets import MissingAssetError
    from mfim.params_schema import ParamsError
    from mfim.weights import CheckpointError

    try:
        return int(args.func(args) or 0)
    except ParamsError as e:  # the params file a command reads (e.g. --fit-steps' weights): its one line
        print(f"mfim {args.command}: {e}", file=sys.stderr)
        return 2
    except (MissingAssetError, CheckpointError) as e:
        print(f"mfim: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # every file is written atomically: what is complete stays, nothing is torn
        print(f"mfim {args.command}: interrupted; files written so far are complete, nothing half-written was "
              "left under a final name", file=sys.stderr)
        return 130
    except OSError as e:  # a full or read-only disk, a name the filesystem refuses: the one line, not a traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"mfim {args.command}: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
