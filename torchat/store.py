"""The content-addressed artifact store, and the realization of graph nodes into it.

Each node's output lives in `<store>/<step>/<key16>-<name>/` with fixed file names and a `manifest.json`. The
key is the sha256 of the preimage: the step, its verb and arguments, its resolved spec, the sha256 of every
output of its inputs (content, not keys: an upstream rebuild that reproduces its bytes rebuilds nothing
downstream), the sha256 of the source files the step runs, and the versions of its toolchain. The manifest
holds that preimage and the sha256, size and mtime of every output.

A directory counts as done only when its manifest parses, names the expected key and every output matches
(size, then mtime, else a rehash). Steps run `python -m torchat VERB ...` into a temp directory beside the
final one, under a per-key lock, and publish it by one rename (torchat.publish): a killed build leaves a `.tmp-*`
directory that is never read and is swept by the next build of that key.

With a remote cache configured (torchat.cache: $TORCHAT_REMOTE_CACHE or [cache] in the config file), a key
missing here is looked up there first and, on a hit, downloaded into the temp directory, checked file by file
against the remote manifest and published the same way, without running the step; in read-write mode a fresh
build is uploaded before it is renamed into place. A remote that fails is one warning line and a local build.
Nothing in an artifact depends on where a store lies (the manifest's command and inputs are store-relative), so
keys and bytes agree between stores. Standard library only (torchat.cache.remote, which imports fsspec, is
imported when a remote is configured).
"""

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from torchat.errors import TorchatError
from torchat.publish import fsync, locked, publish_dir, publish_file, remove_dir, sha256_file, sweep
from torchat.spec import REPO_ROOT, STEPS, Node, Ref, verb_code_path

MANIFEST = "manifest.json"
FORMAT = 1

_code_cache: dict[tuple[Path, str], dict[str, str]] = {}
_version_cache: dict[str, str] = {}
_found: dict[tuple[str, str], tuple[Path, dict]] = {}
_remotes: dict[str, object] = {}  # a remote cache's settings -> its RemoteCache, or None once it failed here


def artifacts_dir() -> Path:
    """$TORCHAT_ARTIFACTS, else the checkout's artifacts/."""
    return Path(os.environ.get("TORCHAT_ARTIFACTS") or REPO_ROOT / "artifacts").expanduser().resolve()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def code_digests(paths: tuple[str, ...], root: Path = REPO_ROOT) -> dict[str, str]:
    """Repo-relative file -> sha256 for every file under `paths` (hashed, never imported); absent -> "absent"."""
    digests: dict[str, str] = {}
    for rel in paths:
        if (root, rel) not in _code_cache:
            full, found = root / rel, {}
            if full.is_file():
                found[rel] = sha256_file(full)
            elif full.is_dir():
                for f in sorted(full.rglob("*")):
                    if f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".pyc", ".pyo"):
                        found[f.relative_to(root).as_posix()] = sha256_file(f)
            _code_cache[root, rel] = found or {rel: "absent"}
        digests.update(_code_cache[root, rel])
    return digests


def toolchain_versions(distributions: tuple[str, ...]) -> dict[str, str]:
    """Python and each distribution's installed version, read from metadata without importing it."""
    if not distributions:
        return {}
    for dist in distributions:
        if dist not in _version_cache:
            try:
                _version_cache[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                _version_cache[dist] = "absent"
    return {"python": platform.python_version(), **{d: _version_cache[d] for d in distributions}}


def artifact_dir(node: Node, key: str) -> Path:
    return artifacts_dir() / node.step / f"{key[:16]}-{node.name}"


def read_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def check_artifact(directory: Path, key: str | None = None) -> dict | None:
    """The manifest if `directory` is a complete artifact (of `key`, when given), else None."""
    manifest = read_manifest(directory)
    if manifest is None or (key is not None and manifest.get("key") != key) or not manifest.get("outputs"):
        return None
    for name, out in manifest["outputs"].items():
        try:
            stat = (directory / name).stat()
        except OSError:
            return None
        if stat.st_size != out["size"]:
            return None
        if stat.st_mtime_ns != out["mtime_ns"] and sha256_file(directory / name) != out["sha256"]:
            return None
    return manifest


def _arg_for_key(arg) -> str:
    return f"<{arg.role}>/{arg.path}" if isinstance(arg, Ref) else str(arg)


def render_args(node: Node, dirs: dict[str, Path]) -> list[str]:
    return [str(dirs[a.role] / a.path if a.path else dirs[a.role]) if isinstance(a, Ref) else str(a)
            for a in node.args]


def _local_manifest(node: Node) -> dict | None:
    found = find(node)
    return None if found is None else found[1]


def preimage(node: Node, manifest_of=_local_manifest) -> dict | None:
    """What the node's key hashes; None while an input is not built (its outputs' digests are not known).

    manifest_of: an input node -> its artifact's manifest or None (default: the local store's)."""
    inputs = {}
    for role, dep in node.deps:
        manifest = manifest_of(dep)
        if manifest is None:
            return None
        inputs[role] = {"step": str(dep.step), "outputs": {n: o["sha256"] for n, o in manifest["outputs"].items()}}
    return {"format": FORMAT, "step": str(node.step), "verb": node.verb,
            "args": [_arg_for_key(a) for a in node.args], "spec": json.loads(node.spec), "inputs": inputs,
            "code": code_digests(node.code), "toolchain": toolchain_versions(node.toolchain)}


def node_key(node: Node) -> str | None:
    pre = preimage(node)
    return None if pre is None else sha256_json(pre)


def find(node: Node) -> tuple[Path, dict] | None:
    """The node's complete artifact for its current key, as (directory, manifest); None if not built."""
    if node.verb is None:  # an alias (eager build): its artifact is its input's
        return find(node.deps[0][1])
    if (node.step, node.name) in _found:
        return _found[node.step, node.name]
    key = node_key(node)
    if key is None:
        return None
    directory = artifact_dir(node, key)
    manifest = check_artifact(directory, key)
    if manifest is None:
        return None
    _found[node.step, node.name] = directory, manifest
    return directory, manifest


def is_done(node: Node) -> bool:
    return find(node) is not None


def step_command() -> list[str]:
    """How steps call the library: `python -m torchat`; $TORCHAT_STEP_CLI stands in for it in graph tests."""
    override = os.environ.get("TORCHAT_STEP_CLI")
    return shlex.split(override) if override else [sys.executable, "-m", "torchat"]


def _run_verb(node: Node, dirs: dict[str, Path]) -> None:
    if not os.environ.get("TORCHAT_STEP_CLI"):
        path = verb_code_path(node.verb)
        if path is None or not (REPO_ROOT / path).exists():
            raise TorchatError(f"`torchat {node.verb}` does not exist yet ({STEPS[node.step].provider} provides "
                               f"it); {node.task} was not built")
    argv = [*step_command(), node.verb, *render_args(node, dirs)]
    returncode = subprocess.run(argv, stdin=subprocess.DEVNULL).returncode
    if returncode != 0:
        raise TorchatError(f"`torchat {node.verb}` exited with status {returncode}; {node.task} was not built "
                           f"(command: {shlex.join(argv)})")


def recorded_command(node: Node, dirs: dict[str, Path], final: Path) -> str:
    """The step's command as the manifest records it: directories relative to the store, so that the same step
    records the same command in any store (run it from the store's root)."""
    root = artifacts_dir()
    relative = {role: Path(d.relative_to(root)) for role, d in {**dirs, "out": final}.items()}
    return shlex.join(["torchat", node.verb, *render_args(node, relative)])


def _hash_outputs(directory: Path) -> dict[str, dict]:
    outputs = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            fsync(f)
            stat = f.stat()
            outputs[f.relative_to(directory).as_posix()] = {"sha256": sha256_file(f), "size": stat.st_size,
                                                            "mtime_ns": stat.st_mtime_ns}
    return outputs


def _write_manifest(directory: Path, manifest: dict) -> None:
    with publish_file(directory / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _temp_prefix(key16: str) -> str:
    """What a build of this key (and a removal of its artifact) names its temporaries: swept under the key's lock."""
    return f".tmp-{key16}-"


def remove_artifact(directory: Path) -> None:
    """Make the artifact disappear at once (rename), then delete it."""
    remove_dir(directory, _temp_prefix(directory.name[:16]))


def remote_cache():
    """The configured remote cache (torchat.cache.remote.RemoteCache), opened once a process; None when none is
    configured, or when it failed earlier in this process (the store said so once and builds locally)."""
    from torchat.cache.config import load_cache_config

    config = load_cache_config()
    if config is None:
        return None
    if config.identity not in _remotes:
        from torchat.cache.remote import RemoteCache

        _remotes[config.identity] = RemoteCache(config)
    return _remotes[config.identity]


def _remote_failed(remote, error: Exception, then: str = "building locally") -> None:
    """One warning line, then no more tries of that remote in this process."""
    _remotes[remote.config.identity] = None
    print(f"torchat: warning: the remote cache is unavailable, {then}: {error}", file=sys.stderr)


def _download(remote, node: Node, key: str, final: Path, dirs: dict[str, Path]) -> dict | None:
    """Publish the remote entry of `key` at `final`, every file checked against its manifest, as if it had been
    built here; None if the remote has no such entry. Raises RemoteUnavailable or EntryRefused."""
    shared = remote.manifest(node.step, key)
    if shared is None:
        return None
    with publish_dir(final, _temp_prefix(key[:16])) as tmp:
        remote.download(shared, tmp, node.task)  # streamed, hashed and synced file by file
        outputs = {n: {**out, "mtime_ns": (tmp / n).stat().st_mtime_ns} for n, out in shared["outputs"].items()}
        manifest = {**shared, "name": node.name, "model": node.model, "outputs": outputs,
                    "command": recorded_command(node, dirs, final),
                    "inputs": {r: d.relative_to(artifacts_dir()).as_posix() for r, d in dirs.items()}}
        _write_manifest(tmp, manifest)
    return manifest


def _pull(node: Node, key: str, final: Path, dirs: dict[str, Path], strict: bool) -> tuple[dict | None, frozenset]:
    """The remote cache's entry for `key`, published at `final`: (its manifest, {}); on a miss (None, {}); on a
    refused entry (None, the digests whose remote bytes are wrong: the upload after the local build repairs them).
    A remote that fails is warned about once (strict: a failure or a refused entry raises TorchatError)."""
    remote = remote_cache()
    if remote is None:
        return None, frozenset()
    from torchat.cache.remote import EntryRefused, RemoteUnavailable

    try:
        manifest = _download(remote, node, key, final, dirs)
    except (RemoteUnavailable, EntryRefused) as error:
        if strict:
            raise TorchatError(f"{node.task}: the remote cache's entry {key[:16]}: {error}") from None
        if isinstance(error, RemoteUnavailable):
            _remote_failed(remote, error)
            return None, frozenset()
        print(f"torchat: warning: {node.task}: refused the remote cache's entry {key[:16]} ({error}); building it "
              f"here{' and repairing the entry' if remote.writable else ''}", file=sys.stderr)
        return None, error.bad_blobs
    if manifest is not None:
        try:
            remote.mark_used(node.step, key)
        except RemoteUnavailable as error:
            _remote_failed(remote, error, "going on without it")
    return manifest, frozenset()


def _push(directory: Path, manifest: dict, force: frozenset[str]) -> None:
    """Upload a fresh build to the remote cache in read-write mode (files first, manifest last)."""
    remote = remote_cache()
    if remote is None or not remote.writable:
        return
    from torchat.cache.remote import RemoteUnavailable

    try:
        remote.upload(directory, manifest, force)
    except RemoteUnavailable as error:
        _remote_failed(remote, error, "keeping the build here only (`torchat cache push` uploads it later)")


def realize(node: Node, build: bool = True) -> tuple[Path, dict]:
    """Build the node's artifact unless a complete one exists here or in the remote cache; raise TorchatError if
    the step fails. build=False: fetch it from the remote cache or fail, never run the step."""
    dirs = {}
    for role, dep in node.deps:
        found = find(dep)
        if found is None:
            raise TorchatError(f"{node.task}: its input {dep.task} is not built; run `doit {dep.task}`")
        dirs[role] = found[0]
    if node.verb is None:
        return find(node)
    pre = preimage(node)
    key = sha256_json(pre)
    final = artifact_dir(node, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    with locked(final.parent / f".lock-{key[:16]}"):
        manifest, repair = check_artifact(final, key), frozenset()
        if manifest is None:
            sweep(final.parent, _temp_prefix(key[:16]))
            # an incomplete or tampered directory under the final name is replaced
            manifest, repair = _pull(node, key, final, dirs, strict=not build)
        if manifest is None and not build:
            remote = remote_cache()
            where = f"the remote cache {remote.url}" if remote else "any remote cache: none is configured"
            raise TorchatError(f"{node.task} ({key[:16]}) is not in {where}; build it with `doit {node.task}`")
        if manifest is None:
            with publish_dir(final, _temp_prefix(key[:16])) as tmp:
                _run_verb(node, {**dirs, "out": tmp})
                outputs = _hash_outputs(tmp)
                if not outputs:
                    raise TorchatError(f"`torchat {node.verb}` wrote nothing; {node.task} was not built")
                manifest = {"format": FORMAT, "key": key, "step": str(node.step), "name": node.name,
                            "model": node.model, "preimage": pre, "outputs": outputs,
                            "command": recorded_command(node, dirs, final),
                            "inputs": {r: d.relative_to(artifacts_dir()).as_posix() for r, d in dirs.items()},
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                _write_manifest(tmp, manifest)
                _push(tmp, manifest, repair)  # before the rename: a build killed while uploading is built again
    _found[node.step, node.name] = final, manifest
    return final, manifest


def artifacts(step: str | None = None) -> list[tuple[Path, dict]]:
    """Every complete artifact in the store (of one step, if given), as (directory, manifest)."""
    root = artifacts_dir()
    steps = [root / step] if step else sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    found = []
    for step_dir in steps:
        for directory in sorted(step_dir.iterdir()) if step_dir.is_dir() else []:
            if not directory.name.startswith(".") and (manifest := check_artifact(directory)) is not None:
                found.append((directory, manifest))
    return found


def remove_named(node: Node) -> list[Path]:
    """Remove every artifact of this node's step and name, whatever its key (what `doit clean` does)."""
    step_dir = artifacts_dir() / node.step
    removed = [d for d in (step_dir.glob(f"*-{node.name}") if step_dir.is_dir() else [])
               if not d.name.startswith(".") and d.name[17:] == node.name]
    for directory in removed:
        remove_artifact(directory)
    _found.pop((node.step, node.name), None)
    return removed


def realize_with_inputs(node: Node) -> tuple[Path, dict]:
    """Realize the node's inputs first, depth first, then the node (doit orders the tasks itself)."""
    for _, dep in node.deps:
        realize_with_inputs(dep)
    return realize(node)
