"""Push, pull and status of graph nodes and everything they depend on, between the store and the remote cache
(what `torchat cache` runs). A node's key needs its inputs' output digests: they come from the local store, else
from the inputs' remote manifests, so `status` can say where a target is before anything of it is here.
"""

from dataclasses import dataclass
from pathlib import Path

from torchat import store
from torchat.cache.remote import EntryRefused, RemoteCache
from torchat.errors import TorchatError
from torchat.spec import Node


def open_remote() -> RemoteCache:
    """The configured remote cache; TorchatError naming how to configure one if none is."""
    remote = store.remote_cache()
    if remote is None:
        raise TorchatError("no remote cache is configured; set TORCHAT_REMOTE_CACHE=URL (s3://bucket/prefix, "
                           "gs://bucket/prefix, file:///path) or a [cache] table with url in ~/.config/torchat/"
                           "config.toml (see docs/remote-cache.md)")
    return remote


def closure(nodes: list[Node]) -> list[Node]:
    """The nodes and everything they depend on, inputs first, once each; aliases (eager builds) stand for their
    input and are left out."""
    ordered, seen = [], set()

    def visit(node: Node) -> None:
        if node.task in seen:
            return
        seen.add(node.task)
        for _, dep in node.deps:
            visit(dep)
        if node.verb is not None:
            ordered.append(node)

    for node in nodes:
        visit(node)
    return ordered


@dataclass
class Where:
    node: Node
    key: str | None          # None: an input is neither here nor in the remote, so the key is not known yet
    local: Path | None       # the complete local artifact, if any
    remote: dict | None      # the remote entry's manifest, if any
    problem: str = ""        # why the remote entry was refused

    @property
    def state(self) -> str:
        if self.key is None:
            return "unknown"
        return {(True, True): "both", (True, False): "local", (False, True): "remote"}.get(
            (self.local is not None, self.remote is not None), "refused" if self.problem else "missing")


def locate(nodes: list[Node], remote: RemoteCache) -> list[Where]:
    """Where each node of the closure is, by the key it has now."""
    found: dict[str, Where] = {}

    def manifest_of(dep: Node) -> dict | None:
        dep = dep if dep.verb is not None else _aliased(dep)
        where = found.get(dep.task)
        if where is None:
            return None
        local = store.check_artifact(where.local, where.key) if where.local else None
        return local or where.remote

    for node in closure(nodes):
        pre = store.preimage(node, manifest_of)
        key = None if pre is None else store.sha256_json(pre)
        where = Where(node, key, None, None)
        if key is not None:
            directory = store.artifact_dir(node, key)
            where.local = directory if store.check_artifact(directory, key) else None
            try:
                where.remote = remote.manifest(node.step, key)
            except EntryRefused as refused:
                where.problem = str(refused)
        found[node.task] = where
    return list(found.values())


def _aliased(node: Node) -> Node:
    while node.verb is None:
        node = node.deps[0][1]
    return node


def pull(nodes: list[Node], report=print) -> int:
    """Fetch every node of the closure that is not here from the remote cache (never building); how many."""
    open_remote()
    fetched = 0
    for node in closure(nodes):
        if store.find(node) is not None:
            continue
        directory, _ = store.realize(node, build=False)
        report(f"pulled {node.task} -> {directory}")
        fetched += 1
    return fetched


def push(nodes: list[Node] | None, force: bool = False, report=print) -> int:
    """Upload the closure's local artifacts (every artifact in the store, without nodes) that the remote lacks
    (force: all of them, files too); how many. A node of the closure that is not built here is an error."""
    remote = open_remote()
    if nodes is None:
        pairs = store.artifacts()
    else:
        pairs = []
        for node in closure(nodes):
            found = store.find(node)
            if found is None:
                raise TorchatError(f"{node.task} is not built here; build it first with `doit {node.task}`")
            pairs.append(found)
    pushed = 0
    for directory, manifest in pairs:
        try:
            if not force and remote.manifest(manifest["step"], manifest["key"]) is not None:
                continue
        except EntryRefused:
            pass  # a bad entry: this upload replaces it
        forced = frozenset(o["sha256"] for o in manifest["outputs"].values()) if force else frozenset()
        remote.upload(directory, manifest, forced)
        report(f"pushed {manifest['step']}:{manifest['name']} ({manifest['key'][:16]})")
        pushed += 1
    return pushed
