"""`torchat download|list|where|remove`: the model management verbs.

`download MODEL` publishes the model's files into the artifact store exactly as `doit download:MODEL` does
(same key, same directory); with --output-dir it only fetches them there, which is what that step runs.
`list` shows the known models and what of theirs is built; `where` prints an artifact's directory; `remove`
deletes a model's (or a target's) artifacts and, for a model, its cached downloads. No torch here.
"""

import argparse
import os
import shutil
from pathlib import Path

from torchat import sources, spec, store
from torchat.errors import TorchatError
from torchat.sources import ALLOW_UNPINNED_ENV, check_pinned, fetch_model_files


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    if verb == "download":
        parser.add_argument("model", metavar="MODEL", help="a model key of targets/models.toml")
        parser.add_argument("--allow-unpinned", action="store_true",
                            help=f"fetch files whose sha256 is not pinned (or set {ALLOW_UNPINNED_ENV}=1)")
        parser.add_argument("--output-dir", type=Path,
                            help="only fetch the files into this directory (what the graph's download step runs)")
    elif verb == "list":
        parser.add_argument("--all", action="store_true", help="also show artifacts of stale keys")
    elif verb == "where":
        parser.add_argument("name", nargs="?", metavar="MODEL|TARGET",
                            help="a model (its downloaded files) or a target (its model); none: the store")
        parser.add_argument("--step", choices=list(spec.Step), help="that step's artifact instead")
    elif verb == "remove":
        parser.add_argument("name", metavar="MODEL|TARGET",
                            help="a model (all its artifacts and cached files) or a target (its own artifacts)")


def _download(args, catalog: spec.Catalog) -> int:
    model = catalog.model(args.model)
    allow = args.allow_unpinned or os.environ.get(ALLOW_UNPINNED_ENV) == "1"
    if args.output_dir is not None:
        fetch_model_files(model, args.output_dir, allow)
        return 0
    check_pinned(model, allow)
    if not model.pinned:
        # pin on first use first (targets/pins.lock), so that the store keys the download by its digests
        fetch_model_files(model, sources.cache_dir() / "models" / model.key, allow)
        catalog = spec.load_catalog()
        model = catalog.model(args.model)
    if allow:
        os.environ[ALLOW_UNPINNED_ENV] = "1"  # for the step's subprocess
    directory, manifest = store.realize(catalog.download_node(model))
    for name in manifest["outputs"]:
        print(directory / name)
    return 0


def _current_dirs(catalog: spec.Catalog) -> dict[Path, str]:
    """The directory of every artifact that is current for the targets as they are declared now -> task."""
    current = {}
    for directory, manifest in store.artifacts():
        try:
            node = catalog.node_for(spec.Step(manifest["step"]), manifest["name"])
        except (TorchatError, ValueError):
            continue
        found = store.find(node)
        if found is not None:
            current[found[0]] = node.task
    return current


def _list(args, catalog: spec.Catalog) -> int:
    built: dict[str, list[str]] = {}
    current = _current_dirs(catalog)
    for directory, manifest in store.artifacts():
        if directory in current or args.all:
            label = f"{manifest['step']}:{manifest['name']}" + ("" if directory in current else " (stale)")
            built.setdefault(manifest.get("model", ""), []).append(label)
    rows = [("MODEL", "FORMAT", "CONFIG", "FILES", "DOWNLOADED")]
    for key, model in sorted(catalog.models.items(), key=lambda kv: kv[0].lower()):
        files = ("pinned" if model.pinned else "unpinned") + (", gated" if model.gated else "")
        downloaded = any(t.startswith("download:") for t in built.get(key, []))
        rows.append((key + (" (default)" if key == catalog.default_model else ""), model.format, model.config,
                     files, "yes" if downloaded else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        built_here = [t for t in built.get(row[0].split()[0], []) if not t.startswith("download:")]
        if row is not rows[0] and built_here:
            print("    built: " + ", ".join(built_here))
    print(f"{len(catalog.models)} models, {len(catalog.targets)} targets in the matrix (doit list --all); "
          f"artifacts in {store.artifacts_dir()}")
    return 0


def _node_for_name(catalog: spec.Catalog, name: str, step: str | None) -> spec.Node:
    if step is not None:
        return catalog.node_for(spec.Step(step), name)
    if name in catalog.models:
        return catalog.download_node(catalog.models[name])
    return catalog.model_node(catalog.parse_target(name))


def _where(args, catalog: spec.Catalog) -> int:
    if args.name is None:
        print(store.artifacts_dir())
        return 0
    node = _node_for_name(catalog, args.name, args.step)
    found = store.find(node)
    if found is None:
        how = f"torchat download {args.name}" if node.step == spec.Step.DOWNLOAD else f"doit {node.task}"
        raise TorchatError(f"{node.task} is not built (for its current key); run `{how}`")
    print(found[0])
    return 0


def _remove_model(catalog: spec.Catalog, model: spec.ModelSpec) -> list[Path]:
    removed = []
    for directory, manifest in store.artifacts():
        if manifest.get("model") == model.key:
            store.remove_artifact(directory)
            removed.append(directory)
    for f in model.all_files:
        cached = sources.cache_dir() / "files" / f.sha256 if f.sha256 else None  # the cache is keyed by digest
        if cached is not None and cached.is_dir():
            shutil.rmtree(cached)
            removed.append(cached)
    return removed


def _remove(args, catalog: spec.Catalog) -> int:
    if args.name in catalog.models:
        removed = _remove_model(catalog, catalog.models[args.name])
    else:
        target = catalog.parse_target(args.name)
        nodes = [catalog.model_node(target), *(catalog.measure_node(s, target) for s in (spec.Step.EVAL,
                                                                                          spec.Step.BENCH))]
        removed = [d for node in nodes for d in store.remove_named(node)]
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print(f"nothing of {args.name} is stored")
    return 0


VERB_RUNNERS = {"download": _download, "list": _list, "where": _where, "remove": _remove}


def run(args) -> int:
    return VERB_RUNNERS[args.verb](args, spec.load_catalog())
