"""``python -m diffusers_block.bench <command> [options]``.

Each command is a module of this package with ``add_arguments(parser)`` and ``run(args)``; add one by listing it
in COMMANDS. ``main(argv)`` is also what tests call.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import attention, attention_quality, cache, distill, parallel, policy, quality, report

COMMANDS = {
    "cache": cache,
    "quality": quality,
    "policy": policy,
    "attention": attention,
    "attention-quality": attention_quality,
    "distill": distill,
    "parallel": parallel,
}


def main(argv: Sequence[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m diffusers_block.bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        summary = module.__doc__.splitlines()[0]
        command = commands.add_parser(
            name, help=summary, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(command)
        command.add_argument(
            "--allow-dirty",
            action="store_true",
            help='run on a tree with uncommitted changes (the result is flagged "dirty": true); refused otherwise',
        )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in result files as the command line
    report.check_tree(args.allow_dirty)  # before the run, so that a refusal costs nothing
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    main()
