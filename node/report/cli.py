"""`ainode report usage` and `ainode replay`: read-only commands over the store."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path


def _store(loaded):  # type: ignore[no-untyped-def]
    from node.report.readonly import ReadOnlyStore, StoreMissing

    try:
        return ReadOnlyStore(loaded.storage.database_url)
    except StoreMissing as exc:
        print(f"{loaded.source}: {exc}", file=sys.stderr)
        sys.exit(1)


def cmd_report_usage(args: argparse.Namespace) -> int:
    from node.cli import _load
    from node.report.usage import print_table, usage, write_csv

    loaded = _load(args.config)
    store = _store(loaded)
    try:
        report = usage(store, loaded.config.departments, args.month, [b.strip() for b in args.by.split(",") if b.strip()])
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    finally:
        store.close()
    print_table(report)
    if args.csv:
        try:
            write_csv(report, Path(args.csv))
        except OSError as exc:
            print(f"--csv {args.csv}: cannot write: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"wrote {args.csv}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from node.cli import _load
    from node.report.replay import parse_since, print_result, replay

    new = _load(args.config)
    current = _load(args.db_config) if args.db_config else new
    try:
        since = parse_since(args.since)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    store = _store(current)
    try:
        result = replay(store, new.config.rules, since)
    finally:
        store.close()
    print_result(result, new.source)
    return 0


def add_parsers(sub) -> None:  # type: ignore[no-untyped-def]
    """Register `report usage` and `replay` on the `ainode` subparsers."""
    r = sub.add_parser("report", help="reports from the store (usage)")
    rsub = r.add_subparsers(dest="report_command", required=True)
    u = rsub.add_parser("usage", help="studies processed per plugin and department in a month (table, CSV)")
    u.add_argument("--config", help="the node's config (store location and departments: mapping)")
    u.add_argument("--month", default=datetime.now().strftime("%Y-%m"), help="YYYY-MM, local time (default: this month)")
    u.add_argument("--by", default="plugin,department",
                   help="comma-separated grouping: plugin, department, rule, calling_ae (default: plugin,department)")
    u.add_argument("--csv", help="also write the rows to this CSV file")
    u.set_defaults(func=cmd_report_usage)

    p = sub.add_parser("replay", help="which past studies a changed rule set would route differently (sends nothing)")
    p.add_argument("--config", required=True, help="config holding the new rules")
    p.add_argument("--db-config", help="the running node's config, for its store (default: --config's storage)")
    p.add_argument("--since", default="7d", help="studies received since: 7d, 12h, 30m or YYYY-MM-DD (default 7d)")
    p.set_defaults(func=cmd_replay)
