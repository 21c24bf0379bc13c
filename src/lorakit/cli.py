"""The `lorakit` command line."""

from __future__ import annotations

import argparse
import sys

import lorakit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-Rank Adaptation (LoRA) for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"lorakit {lorakit.__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0
