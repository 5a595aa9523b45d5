"""The remote cache's layout and its operations, over any fsspec filesystem.

    <url>/v1/blobs/<sha[:2]>/<sha256>          every output file, named by its content (shared by entries)
    <url>/v1/entries/<step>/<key>.json         an entry: the artifact's manifest, written after its blobs
    <url>/v1/used/<step>/<key>                 when a read-write client last built or fetched the entry

Bazel's remote cache has the same two halves (an action cache of manifests over a content-addressed store).
An entry exists once its manifest does, and its manifest is written only after every blob it names is complete,
so an upload killed half way is never an entry. Blobs are named by their sha256, so two stores uploading the
same key at once write the same bytes to the same names and end with one consistent entry; each object appears
whole (an object store's PUT or multipart upload appears when complete; a file:// write goes to a temporary
name that one rename puts in place, which fsspec's local filesystem does not do by itself).

Nothing from the remote is trusted: a manifest is refused unless its key is the sha256 of its preimage and the
key asked for, and every file name stays inside the entry; a download is hashed as it streams and refused unless
every file has the manifest's size and sha256. A refused entry is the caller's to rebuild (and, read-write, to
repair by uploading again). Transport failures (down, slow: the timeouts, denied) raise RemoteUnavailable with
a message scrubbed of secrets; the store then builds locally.
"""

import contextlib
import datetime
import hashlib
import json
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path, PurePosixPath

from torchat.cache.config import CacheConfig, redact
from torchat.errors import TorchatError
from torchat.publish import fsync, sha256_file

LAYOUT = "v1"
MANIFEST_FORMAT = 1             # torchat.store.FORMAT, whose manifests these are
STREAM_CHUNK = 8 << 20          # bytes a read or an upload part moves at once: memory stays bounded
MAX_MANIFEST_BYTES = 64 << 20
S3_SCHEMES = ("s3", "s3a")
TRANSFER_READ_TIMEOUT = 300.0   # seconds an upload's or download's request may wait for the server (s3)
_SHA256 = re.compile(r"[0-9a-f]{64}")
# per driver: s3fs uploads in parts of `chunksize` held in memory, `max_concurrency` at once (a file under two
# parts in one read), an object appearing only when whole; its get_file streams one GET unless told to split it
# into concurrent ranged parts, each held in memory
_PUT_OPTIONS = {"s3": {"chunksize": STREAM_CHUNK, "max_concurrency": 4}}
_GET_OPTIONS = {"s3": {"max_concurrency": 1}}


class RemoteUnavailable(Exception):
    """The remote did not answer in time, refused the connection or the request (message free of secrets)."""


class EntryRefused(Exception):
    """A remote entry that must not be used: bad manifest, key, file name, or a file whose bytes differ."""

    def __init__(self, message: str, bad_blobs: frozenset[str] = frozenset()):
        super().__init__(message)
        self.bad_blobs = bad_blobs  # digests whose remote bytes are wrong or missing: a repair uploads them again


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime.datetime:
    stamp = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.timezone.utc)


def check_output_name(name) -> str:
    """A manifest's file name, if it stays inside its directory; else EntryRefused."""
    path = PurePosixPath(name) if isinstance(name, str) else None
    if (path is None or not name or path.is_absolute() or "\\" in name or "\0" in name
            or any(part in ("", ".", "..") for part in name.split("/")) or name == "manifest.json"):
        raise EntryRefused(f"its manifest names the file {name!r}, outside its directory")
    return name


def check_manifest(manifest, step: str, key: str) -> dict:
    """The manifest of the entry `step`/`key`, if it is one: its key is the hash of its preimage and every file
    stays inside the entry; else EntryRefused."""
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise EntryRefused("its manifest is not a torchat manifest of this format")
    if manifest.get("key") != key or manifest.get("step") != step:
        raise EntryRefused(f"its manifest is of {manifest.get('step')}/{str(manifest.get('key'))[:16]}, not of "
                           f"{step}/{key[:16]}")
    preimage = manifest.get("preimage")
    if not isinstance(preimage, dict) or sha256_json(preimage) != key or preimage.get("step") != step:
        raise EntryRefused("its key is not the hash of its preimage")
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        raise EntryRefused("its manifest names no files")
    for name, out in outputs.items():
        check_output_name(name)
        if not (isinstance(out, dict) and isinstance(out.get("sha256"), str) and _SHA256.fullmatch(out["sha256"])
                and isinstance(out.get("size"), int) and out["size"] >= 0):
            raise EntryRefused(f"its manifest gives {name!r} no valid sha256 and size")
    return manifest


def shared_manifest(manifest: dict) -> dict:
    """What the remote keeps of a local manifest: the same, less each file's local mtime."""
    outputs = {name: {k: v for k, v in out.items() if k != "mtime_ns"} for name, out in manifest["outputs"].items()}
    return {**manifest, "outputs": outputs}


def _progress(total: int, label: str):
    """A byte progress bar on a terminal (stderr), nothing elsewhere."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False,
                disable=not sys.stderr.isatty() or total < STREAM_CHUNK)


def _short(got: str) -> str:
    return got[:16] if _SHA256.fullmatch(got) else got


def _callback(bar):
    """An fsspec callback that moves a tqdm bar by the bytes a driver reports."""
    from fsspec.callbacks import Callback

    start = bar.n

    class Progress(Callback):
        def call(self, *args, **kwargs):
            bar.update(start + self.value - bar.n)

    return Progress()


def _driver_options(config: CacheConfig, read_timeout: float) -> dict:
    """The driver's options, with torchat's timeouts for the drivers that take them."""
    options = dict(config.options)
    if config.url.split("://")[0] in S3_SCHEMES:
        # botocore's own retries times s3fs's (5 each by default) make a dead endpoint cost minutes; two of each
        # still ride out a dropped connection
        kwargs = {"connect_timeout": config.timeout, "read_timeout": read_timeout,
                  "retries": {"max_attempts": 2, "mode": "standard"}}
        options["config_kwargs"] = {**kwargs, **options.get("config_kwargs", {})}
        options.setdefault("skip_instance_cache", True)  # the retries are set on the instance below
    return options


class RemoteCache:
    """One remote cache, opened through its fsspec driver."""

    def __init__(self, config: CacheConfig):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.config = config
        try:
            self.fs, root = fsspec.core.url_to_fs(config.url, **_driver_options(config, config.timeout))
            # transfers get a longer read timeout: completing a multipart upload of a large file, or the first
            # byte of one, may take the server minutes; a down or slow remote shows in the lookups first
            self.bulk = self.fs
            if config.url.split("://")[0] in S3_SCHEMES:
                long = max(config.timeout, TRANSFER_READ_TIMEOUT)
                self.bulk = fsspec.core.url_to_fs(config.url, **_driver_options(config, long))[0]
        except (ImportError, ValueError) as error:
            raise TorchatError(f"{config.origin} {config.url}: {redact(str(error))} (pip install s3fs for s3://, "
                               "gcsfs for gs://)") from None
        for fs in (self.fs, self.bulk):
            if hasattr(fs, "retries"):
                fs.retries = 2
        self.root = f"{root.rstrip('/')}/{LAYOUT}"
        self.local = isinstance(self.fs, LocalFileSystem)
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def writable(self) -> bool:
        return self.config.writable

    def entry_path(self, step: str, key: str) -> str:
        return f"{self.root}/entries/{step}/{key}.json"

    def blob_path(self, digest: str) -> str:
        return f"{self.root}/blobs/{digest[:2]}/{digest}"

    def used_path(self, step: str, key: str) -> str:
        return f"{self.root}/used/{step}/{key}"

    def _unavailable(self, what: str, error: Exception) -> RemoteUnavailable:
        return RemoteUnavailable(f"{self.url}: {what} failed ({type(error).__name__}: {redact(str(error))[:300]})")

    def _io(self, what: str, call, *args, **kwargs):
        """Run one driver call; a missing object stays FileNotFoundError, any other failure is RemoteUnavailable."""
        try:
            return call(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as error:  # the drivers' failures have no common base (botocore's, aiohttp's, OSError)
            raise self._unavailable(what, error) from None

    def _write(self, what: str, call, *args, **kwargs):
        """Run one writing driver call: any failure, a "missing" one too (an upload the server lost), is
        RemoteUnavailable."""
        try:
            return call(*args, **kwargs)
        except Exception as error:  # as in _io
            raise self._unavailable(what, error) from None

    # reading

    def manifest(self, step: str, key: str) -> dict | None:
        """The checked manifest of the entry step/key; None if there is none. Raises EntryRefused or
        RemoteUnavailable."""
        try:
            data = self._io("looking up an entry", self.fs.cat_file, self.entry_path(step, key))
        except FileNotFoundError:
            return None
        return self._parse(data, step, key)

    def _parse(self, data: bytes, step: str, key: str) -> dict:
        if len(data) > MAX_MANIFEST_BYTES:
            raise EntryRefused("its manifest is too large to be one")
        try:
            manifest = json.loads(data)
        except ValueError:
            raise EntryRefused("its manifest is not JSON") from None
        return check_manifest(manifest, step, key)

    def _stream_blob(self, digest: str, size: int, sink, bar) -> str:
        """Copy the blob to `sink` (a binary file, or None to only hash it), at most size + 1 bytes; its sha256."""
        hasher, seen = hashlib.sha256(), 0
        handle = self._io("opening a file", self.fs.open, self.blob_path(digest), "rb", block_size=STREAM_CHUNK,
                          cache_type="none")
        with handle:
            while seen <= size:
                chunk = self._io("reading a file", handle.read, min(STREAM_CHUNK, size + 1 - seen))
                if not chunk:
                    break
                seen += len(chunk)
                hasher.update(chunk)
                if sink is not None:
                    sink.write(chunk)
                bar.update(len(chunk))
        return hasher.hexdigest() if seen == size else f"{seen} bytes"

    def _fetch(self, digest: str, size: int, destination: Path | None, bar) -> str:
        """Fetch a blob into `destination` (None: only hash it); its sha256, or what is wrong ("missing", "N
        bytes"). Raises RemoteUnavailable."""
        try:
            if self.local:  # read in place, hashed as it streams
                with open(destination, "wb") if destination else contextlib.nullcontext() as sink:
                    return self._stream_blob(digest, size, sink, bar)
            actual = self._io("looking up a file", self.fs.size, self.blob_path(digest))
            if actual != size:
                return f"{actual} bytes"
            # an object store: the driver's get_file streams one GET to disk (reads of a few KiB), far cheaper than
            # a ranged request per chunk; the file is hashed once it is there
            with tempfile.TemporaryDirectory() if destination is None else contextlib.nullcontext() as scratch:
                target = destination or Path(scratch) / digest
                self._io("downloading a file", self.bulk.get_file, self.blob_path(digest), str(target),
                         callback=_callback(bar), **_GET_OPTIONS.get(self.protocol, {}))
                got = target.stat().st_size
                return sha256_file(target) if got == size else f"{got} bytes"
        except FileNotFoundError:
            return "missing"

    def download(self, manifest: dict, directory: Path, label: str = "") -> None:
        """Every file of the entry into `directory` (synced), each checked against the manifest's size and sha256.
        Raises EntryRefused naming every file that differs (and RemoteUnavailable)."""
        outputs = manifest["outputs"]
        bad, reasons = set(), []
        with _progress(sum(o["size"] for o in outputs.values()), label or manifest["step"]) as bar:
            for name, out in sorted(outputs.items()):
                destination = directory / check_output_name(name)
                destination.parent.mkdir(parents=True, exist_ok=True)
                got = self._fetch(out["sha256"], out["size"], destination, bar)
                if got != out["sha256"]:
                    bad.add(out["sha256"])
                    reasons.append(f"{name} is {_short(got)}, its manifest says {out['sha256'][:16]}")
                else:
                    fsync(destination)
        if bad:
            raise EntryRefused("; ".join(reasons), frozenset(bad))

    def verify_entry(self, manifest: dict, checked: dict[str, str]) -> list[str]:
        """What is wrong with an entry's files (empty: each has its size and sha256); `checked` memoises blobs."""
        problems = []
        for name, out in sorted(manifest["outputs"].items()):
            digest = out["sha256"]
            if digest not in checked:
                with _progress(out["size"], name) as bar:
                    checked[digest] = self._fetch(digest, out["size"], None, bar)
            if checked[digest] != digest:
                problems.append(f"{name}: {_short(checked[digest])}, expected {digest[:16]}")
        return problems

    def entries(self) -> list[tuple[str, str, dict | EntryRefused]]:
        """Every entry as (step, key, its checked manifest, or the EntryRefused that says why it is not one)."""
        try:
            paths = [p for p in self._io("listing entries", self.fs.find, f"{self.root}/entries")
                     if p.endswith(".json") and "/.tmp-" not in p and not PurePosixPath(p).name.startswith(".")]
        except FileNotFoundError:
            return []
        found = self._io("reading entries", self.fs.cat, paths, on_error="return") if paths else {}
        entries = []
        for path in sorted(found):
            data, parts = found[path], PurePosixPath(path).parts
            step, key = parts[-2], parts[-1].removesuffix(".json")
            if isinstance(data, FileNotFoundError):
                continue  # removed since the listing
            if isinstance(data, Exception):
                raise self._unavailable("reading entries", data)
            try:
                entries.append((step, key, self._parse(data, step, key)))
            except EntryRefused as refused:
                entries.append((step, key, refused))
        return entries

    def last_used(self, entries) -> dict[tuple[str, str], datetime.datetime]:
        """(step, key) -> when a read-write client last built or fetched it (else when it was built)."""
        paths = {self.used_path(step, key): (step, key) for step, key, _ in entries}
        found = self._io("reading use times", self.fs.cat, list(paths), on_error="return") if paths else {}
        used = {}
        for step, key, manifest in entries:
            data = found.get(self.used_path(step, key))
            try:
                used[step, key] = parse_time(data.decode())
            except (AttributeError, ValueError, UnicodeDecodeError):
                created = manifest.get("created", "") if isinstance(manifest, dict) else ""
                try:
                    used[step, key] = parse_time(created)
                except ValueError:
                    used[step, key] = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
        return used

    # writing (read-write mode)

    def _require_writable(self) -> None:
        if not self.writable:
            raise TorchatError(f"the remote cache {self.url} is read-only here; set mode = \"read-write\" in [cache] "
                               "(or TORCHAT_REMOTE_CACHE_MODE=read-write) to write to it")

    def _put_local(self, path: str, write) -> None:
        """file://: write(tmp) to a temporary beside `path`, then one rename: readers never see a partial file."""
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write(tmp)
            fsync(Path(tmp))
            os.replace(tmp, path)
        except OSError as error:
            raise self._unavailable("writing a file", error) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _put_file(self, local: Path, path: str, bar) -> None:
        if self.local:
            def copy(tmp: str) -> None:
                with open(local, "rb") as source, open(tmp, "wb") as sink:
                    while chunk := source.read(STREAM_CHUNK):
                        sink.write(chunk)
                        bar.update(len(chunk))
            self._put_local(path, copy)
            return
        self._write("uploading a file", self.bulk.put_file, str(local), path, callback=_callback(bar),
                 **_PUT_OPTIONS.get(self.protocol, {}))

    def _put_bytes(self, data: bytes, path: str) -> None:
        if self.local:
            self._put_local(path, lambda tmp: Path(tmp).write_bytes(data))
        else:
            self._write("writing a file", self.fs.pipe_file, path, data)

    def _has_blob(self, digest: str, size: int) -> bool:
        try:
            return self._io("looking up a file", self.fs.size, self.blob_path(digest)) == size
        except FileNotFoundError:
            return False

    def upload(self, directory: Path, manifest: dict, force: frozenset[str] = frozenset()) -> None:
        """Upload the artifact in `directory` as the entry of its manifest: its files first (those the remote
        lacks, or whose digest is in `force`), the manifest last."""
        self._require_writable()
        shared = shared_manifest(manifest)
        check_manifest(shared, shared["step"], shared["key"])
        outputs = shared["outputs"]
        todo = {name: out for name, out in sorted(outputs.items())
                if out["sha256"] in force or not self._has_blob(out["sha256"], out["size"])}
        with _progress(sum(o["size"] for o in todo.values()), f"upload {shared['step']}") as bar:
            for name, out in todo.items():
                self._put_file(directory / name, self.blob_path(out["sha256"]), bar)
        self._put_bytes(json.dumps(shared, indent=1, sort_keys=True).encode() + b"\n",
                        self.entry_path(shared["step"], shared["key"]))
        self.mark_used(shared["step"], shared["key"])

    def mark_used(self, step: str, key: str) -> None:
        if self.writable:
            self._put_bytes(utc_now().encode(), self.used_path(step, key))

    def remove_entry(self, step: str, key: str) -> None:
        """Remove an entry: its manifest first (it is gone at once), then its use time; its blobs are gc's."""
        self._require_writable()
        for path in (self.entry_path(step, key), self.used_path(step, key)):
            try:
                self._io("removing an entry", self.fs.rm_file, path)
            except FileNotFoundError:
                pass

    def gc(self, cutoff: datetime.datetime, dry_run: bool = False) -> tuple[list[tuple[str, str]], int, int]:
        """Remove the entries last used before `cutoff`, then the blobs no entry names that are older than it (a
        younger one may belong to an upload whose manifest is not written yet). Returns (removed entries,
        removed blobs, their bytes)."""
        self._require_writable()
        entries = self.entries()
        used = self.last_used(entries)
        old = [(step, key) for step, key, _ in entries if used[step, key] < cutoff]
        if not dry_run:
            for step, key in old:
                self.remove_entry(step, key)
        kept = [m for step, key, m in entries if (step, key) not in old and isinstance(m, dict)]
        referenced = {out["sha256"] for m in kept for out in m["outputs"].values()}
        try:
            blobs = self._io("listing files", self.fs.find, f"{self.root}/blobs", detail=True)
        except FileNotFoundError:
            blobs = {}
        removed, freed = 0, 0
        for path, info in sorted(blobs.items()):
            if PurePosixPath(path).name in referenced:
                continue
            try:
                modified = self._io("reading a file's time", self.fs.modified, path)
            except FileNotFoundError:
                continue
            if (modified if modified.tzinfo else modified.replace(tzinfo=datetime.timezone.utc)) >= cutoff:
                continue
            if not dry_run:
                try:
                    self._io("removing a file", self.fs.rm_file, path)
                except FileNotFoundError:
                    continue
            removed, freed = removed + 1, freed + int(info.get("size") or 0)
        return old, removed, freed
