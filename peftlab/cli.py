"""`peftlab ...` commands."""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

from .adapters.registry import get_method, list_adapters


def cmd_adapters(args: argparse.Namespace) -> int:
    """Print the registry as a table: name, aliases, PEFT file type, first line of the docstring."""
    rows = []
    for name in list_adapters():
        method = get_method(name)
        doc = (method.config.__doc__ or "").strip().splitlines()[0]
        rows.append((name, ",".join(method.aliases) or "-", method.peft_type, doc))
    widths = [max(len(r[i]) for r in rows + [("name", "aliases", "peft_type", "")]) for i in range(3)]
    print(f"{'name':<{widths[0]}}  {'aliases':<{widths[1]}}  {'peft_type':<{widths[2]}}  description")
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}")
    if args.fields:
        method = get_method(args.fields)
        print(f"\n{method.name} config fields:")
        for f in fields(method.config):
            default = f.default_factory() if f.default is MISSING else f.default
            print(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("adapters", help="list the adapter methods", description=cmd_adapters.__doc__,
                       epilog="example: peftlab adapters --fields lora")
    p.add_argument("--fields", metavar="METHOD", help="also list the config fields of METHOD")
    p.set_defaults(run=cmd_adapters)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"peftlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
