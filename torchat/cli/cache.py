"""`torchat cache`: the store's artifacts and the remote cache (docs/remote-cache.md).

    torchat cache status [NAME ...]      where each artifact is: local, remote or both (NAME: it and its inputs)
    torchat cache push [NAME ...]        upload NAME and its inputs (no NAME: every artifact in the store)
    torchat cache pull NAME ...          download NAME and its inputs, checked, never building anything
    torchat cache ls                     the remote's entries: step, name, key, size, last use
    torchat cache verify [--drop-bad]    rehash every file of every remote entry
    torchat cache gc --older-than DATE   drop the entries not used since DATE, then the files none names

NAME is a task as doit names it (build:smollm2-135m-8da4w-et, quantize:smollm2-135m-int8-bf16, convert:MODEL),
or a target name for its build. The remote is $TORCHAT_REMOTE_CACHE or [cache] in ~/.config/torchat/config.toml.
"""

import argparse
import datetime
import re

from torchat import spec, store
from torchat.errors import TorchatError, unknown_key_error

ACTIONS = ("status", "push", "pull", "ls", "verify", "gc")  # none of them imports torch


def cutoff_date(text: str) -> datetime.datetime:
    """--older-than: an ISO date or time (UTC unless it says), or N days ago as `Nd`."""
    if match := re.fullmatch(r"(\d+)d", text):
        return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=int(match[1]))
    try:
        stamp = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a date (2026-11-30), a time (2026-11-30T12:00) or a "
                                         "number of days (30d)") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.timezone.utc)


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]  # the actions, one line each
    parser.add_argument("action", choices=ACTIONS, help="what to do (below)")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="tasks as doit names them (build:TARGET, quantize:MODEL-QUANT-DTYPE, ...) or targets")
    parser.add_argument("--force", action="store_true", help="push: upload again what the remote already has")
    parser.add_argument("--drop-bad", action="store_true", help="verify: remove the entries that fail (read-write)")
    parser.add_argument("--older-than", type=cutoff_date, metavar="DATE",
                        help="gc: entries not used since DATE (2026-11-30, 2026-11-30T12:00, or 30d for 30 days ago)")
    parser.add_argument("--dry-run", action="store_true", help="gc: say what would go, remove nothing")


def nodes_for(names: list[str]) -> list[spec.Node]:
    catalog = spec.load_catalog()
    nodes = []
    for name in names:
        family, sep, rest = name.partition(":")
        if not sep:
            family, rest = spec.Step.BUILD, name
        if family not in list(spec.Step):
            raise unknown_key_error(f"step in {name!r}", family, list(spec.Step))
        nodes.append(catalog.node_for(spec.Step(family), rest))
    return nodes


def _size(manifest: dict) -> str:
    return f"{sum(o['size'] for o in manifest['outputs'].values()) / 2**20:.1f} MiB"


def _print_rows(rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def _status(args, remote) -> int:
    from torchat.cache.sync import locate

    rows = [("WHERE", "TASK", "KEY")]
    if args.names:
        for where in locate(nodes_for(args.names), remote):
            rows.append((where.state, where.node.task, where.key[:16] if where.key else "-"))
    else:
        local = {(m["step"], m["key"]): m for _, m in store.artifacts()}
        shared = {(step, key): m for step, key, m in remote.entries() if isinstance(m, dict)}
        for step, key in sorted(local.keys() | shared.keys()):
            manifest = local.get((step, key)) or shared[step, key]
            state = "both" if (step, key) in local and (step, key) in shared else (
                "local" if (step, key) in local else "remote")
            rows.append((state, f"{step}:{manifest['name']}", key[:16]))
    _print_rows(rows)
    print(f"store {store.artifacts_dir()}, remote {remote.url} ({remote.config.mode})")
    return 0


def _ls(args, remote) -> int:
    entries = remote.entries()
    used = remote.last_used(entries)
    rows = [("STEP", "NAME", "KEY", "SIZE", "LAST USED")]
    for step, key, manifest in entries:
        if isinstance(manifest, dict):
            rows.append((step, manifest["name"], key[:16], _size(manifest),
                         used[step, key].strftime("%Y-%m-%d %H:%M")))
        else:
            rows.append((step, f"(refused: {manifest})", key[:16], "-", "-"))
    _print_rows(rows)
    print(f"{len(entries)} entries in {remote.url}")
    return 0


def _verify(args, remote) -> int:
    if args.drop_bad and not remote.writable:
        raise TorchatError(f"--drop-bad removes entries, and the remote cache {remote.url} is read-only here; set "
                           "TORCHAT_REMOTE_CACHE_MODE=read-write or mode = \"read-write\" in [cache]")
    checked: dict[str, str] = {}
    bad = 0
    entries = remote.entries()
    for step, key, manifest in entries:
        problems = [str(manifest)] if not isinstance(manifest, dict) else remote.verify_entry(manifest, checked)
        label = f"{step}:{manifest['name']}" if isinstance(manifest, dict) else step
        if problems:
            bad += 1
            print(f"BAD {label} {key[:16]}: {'; '.join(problems)}" + (" (removed)" if args.drop_bad else ""))
            if args.drop_bad:
                remote.remove_entry(step, key)
        else:
            print(f"ok  {label} {key[:16]}")
    print(f"{len(entries)} entries, {bad} bad, {len(checked)} files hashed")
    return 1 if bad else 0


def _gc(args, remote) -> int:
    if args.older_than is None:
        raise TorchatError("gc needs --older-than DATE (2026-11-30, or 30d for 30 days ago)")
    removed, blobs, freed = remote.gc(args.older_than, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for step, key in removed:
        print(f"{verb} {step}/{key[:16]}")
    print(f"{verb} {len(removed)} entries not used since {args.older_than:%Y-%m-%d %H:%M} UTC and {blobs} files "
          f"no entry names ({freed / 2**20:.1f} MiB)")
    return 0


def run(args: argparse.Namespace) -> int:
    from torchat.cache.remote import RemoteUnavailable
    from torchat.cache.sync import open_remote, pull, push

    if args.action == "pull" and not args.names:
        raise TorchatError("pull needs a NAME (build:TARGET, or a target name)")
    if args.names and args.action in ("ls", "verify", "gc"):
        raise TorchatError(f"`torchat cache {args.action}` takes no NAME; it covers the whole remote")
    remote = open_remote()
    try:
        if args.action == "pull":
            print(f"{pull(nodes_for(args.names))} artifacts pulled from {remote.url}")
            return 0
        if args.action == "push":
            pushed = push(nodes_for(args.names) if args.names else None, args.force)
            print(f"{pushed} artifacts pushed to {remote.url}")
            return 0
        return {"status": _status, "ls": _ls, "verify": _verify, "gc": _gc}[args.action](args, remote)
    except RemoteUnavailable as error:
        raise TorchatError(str(error)) from None
