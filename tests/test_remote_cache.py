"""The remote artifact cache against real remotes: moto's S3 server (started here on 127.0.0.1, with dummy
credentials) through s3fs, and a file:// directory.

Graph runs use test_store's stub CLI (deterministic outputs; `download` fetches for real and is logged here too),
so the stub log says which steps' verbs ran: a store that pulls from the remote runs none. doit runs in
subprocesses from a frozen copy of the code, as in test_dodo. The remote is inspected with boto3 and the file
system, not with torchat's own code.
"""

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from test_dodo import copy_repo, doit_command, ran
from test_store import STUB, write_tiny_targets

from torchat import spec, store
from torchat.cache import config as cache_config
from torchat.cache import remote as cache_remote
from torchat.errors import TorchatError

TARGET = "alpha-q8-aoti"
CHAIN = {"download:alpha", "convert:alpha", "quantize:alpha-q8-bf16", f"build:{TARGET}"}
SECRET = "s3cr3t-never-printed-9f2c71"
ACCESS_KEY = "AKIATESTNEVERPRINTED"
# test_store's stub, which here also logs `download` (every step's verb shows in the log) and hashes a
# --tokenizer-path by its file name, not its path, as the real verbs do: its outputs are the same in any store
LOGGING_STUB = ('import os as _os, sys as _sys\nif _sys.argv[1] == "download":\n'
                '    open(_os.environ["STUB_LOG"], "a").write("download\\n")\n'
                'if "--tokenizer-path" in _sys.argv:\n'
                '    _at = _sys.argv.index("--tokenizer-path") + 1\n'
                '    _sys.argv[_at] = _os.path.basename(_sys.argv[_at])\n') + STUB


class FaultyMoto:
    """moto's threaded S3 server on 127.0.0.1 behind a WSGI layer that can delay requests or hold those that match
    until released (and then answer 503 without passing them on)."""

    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        faults = self
        self.delay, self.hold, self.released, self.held = 0.0, None, threading.Event(), threading.Event()

        def app(environ, start_response):
            method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
            if faults.delay:
                time.sleep(faults.delay)
            if faults.hold is not None and faults.hold(method, path):
                faults.held.set()
                faults.released.wait(60)
                start_response("503 Service Unavailable", [("Content-Length", "0")])
                return [b""]
            return moto(environ, start_response)

        moto = DomainDispatcherApplication(create_backend_app)

        class Server(ThreadedMotoServer):
            def _server_entry(self):
                self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
                self._server_ready_event.set()
                self._server.serve_forever()

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line a request otherwise
        self.server = Server(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def stop(self):
        self.released.set()
        self.server.stop()


@pytest.fixture(scope="module")
def moto_server():
    server = FaultyMoto()
    yield server
    server.stop()


def s3_env(endpoint: str, tmp_path: Path) -> dict[str, str]:
    """The driver's standard variables, pointed at the test server; no profile files of this machine."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}


class Remote:
    """The test's own view of the remote: its URL and environment, and its objects read with boto3 or os."""

    def __init__(self, kind: str, tmp_path: Path, server: FaultyMoto | None):
        self.kind, self.server = kind, server
        if kind == "s3":
            import boto3

            self.env = s3_env(server.endpoint, tmp_path)
            self.bucket = f"torchat-{uuid.uuid4().hex[:12]}"
            self.client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                                       aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET)
            self.client.create_bucket(Bucket=self.bucket)
            self.url = f"s3://{self.bucket}/team/cache"
        else:
            self.env, self.root = {}, tmp_path / "shared cache"
            self.url = f"file://{self.root}"

    def objects(self) -> dict[str, bytes]:
        """Every object under the cache's prefix, by its path below it."""
        if self.kind == "s3":
            found = {}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix="team/cache/"):
                for item in page.get("Contents", []):
                    body = self.client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
                    found[item["Key"].removeprefix("team/cache/")] = body
            return found
        return {p.relative_to(self.root).as_posix(): p.read_bytes() for p in self.root.rglob("*") if p.is_file()}

    def put(self, name: str, data: bytes) -> None:
        if self.kind == "s3":
            self.client.put_object(Bucket=self.bucket, Key=f"team/cache/{name}", Body=data)
        else:
            (self.root / name).write_bytes(data)

    def entries(self) -> dict[str, dict]:
        return {name: json.loads(data) for name, data in self.objects().items()
                if name.startswith("v1/entries/") and name.endswith(".json")}

    def entry(self, step: str) -> tuple[str, dict]:
        (name, manifest), = [(n, m) for n, m in self.entries().items() if n.startswith(f"v1/entries/{step}/")]
        return name, manifest


@pytest.fixture(params=["file", "s3"])
def remote(request, tmp_path):
    server = request.getfixturevalue("moto_server") if request.param == "s3" else None
    return Remote(request.param, tmp_path, server)


@pytest.fixture
def s3_remote(tmp_path, moto_server):
    moto_server.delay, moto_server.hold = 0.0, None
    moto_server.released.clear()
    moto_server.held.clear()
    yield Remote("s3", tmp_path, moto_server)
    moto_server.delay, moto_server.hold = 0.0, None
    moto_server.released.set()


@pytest.fixture(scope="module")
def frozen_repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture
def targets(tmp_path):
    return write_tiny_targets(tmp_path / "targets")


def store_env(root: Path, targets: Path, frozen_repo: Path, remote: Remote, mode: str = "read-write") -> dict:
    """One store (artifacts, cache, doit db, stub log) under root, using the remote."""
    root.mkdir(parents=True, exist_ok=True)
    stub = root / "stub_torchat.py"
    stub.write_text(LOGGING_STUB)
    (root / "config.toml").write_text("")  # not this machine's config: the environment says everything
    return {"TORCHAT_TARGETS_DIR": str(targets), "TORCHAT_ARTIFACTS": str(root / "artifacts"),
            "TORCHAT_CACHE": str(root / "cache"), "TORCHAT_DOIT_DB": str(root / "doit.db"),
            "TORCHAT_STEP_CLI": f"{sys.executable} {stub}", "STUB_LOG": str(root / "stub.log"),
            "PYTHONPATH": str(frozen_repo), "TORCHAT_CONFIG": str(root / "config.toml"),
            "TORCHAT_REMOTE_CACHE": remote.url, "TORCHAT_REMOTE_CACHE_MODE": mode,
            "TORCHAT_REMOTE_CACHE_TIMEOUT": "2", **remote.env}


def run_doit(env: dict, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(doit_command(env, *args), env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def run_cache(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "torchat", "cache", *args], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def calls(env: dict) -> list[str]:
    log = Path(env["STUB_LOG"])
    return log.read_text().split() if log.exists() else []


def published(env: dict) -> dict[str, bytes]:
    """Every output file of every artifact in the store (manifests aside), by its store-relative path."""
    root = Path(env["TORCHAT_ARTIFACTS"])
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != store.MANIFEST]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files
            if not any(part.startswith(".") for part in p.relative_to(root).parts)}


def manifests(env: dict) -> dict[str, dict]:
    root = Path(env["TORCHAT_ARTIFACTS"])
    return {p.parent.relative_to(root).as_posix(): json.loads(p.read_text()) for p in root.glob(f"*/*/{store.MANIFEST}")
            if not p.parent.name.startswith(".")}


def warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "warning" in line.lower()]


def test_a_second_store_pulls_a_build_without_running_any_step(remote, targets, frozen_repo, tmp_path):
    one = store_env(tmp_path / "one", targets, frozen_repo, remote)
    assert ran(run_doit(one, f"build:{TARGET}")) == CHAIN
    assert calls(one) == ["download", "convert", "quantize", "export"]
    assert {n.split("/")[2] for n in remote.entries()} == {"download", "convert", "quantize", "build"}
    two = store_env(tmp_path / "two", targets, frozen_repo, remote, mode="read-only")
    result = run_doit(two, f"build:{TARGET}")
    assert ran(result) == CHAIN and calls(two) == []  # every task ran, and no step's verb did
    assert not warnings(result), result.stderr
    assert published(two) == published(one) and published(one)
    for name, manifest in manifests(one).items():
        other = manifests(two)[name]
        assert {k: v for k, v in other.items() if k != "outputs"} == {k: v for k, v in manifest.items()
                                                                       if k != "outputs"}
        assert {n: o["sha256"] for n, o in other["outputs"].items()} == {
            n: o["sha256"] for n, o in manifest["outputs"].items()}
    assert ran(run_doit(two, f"build:{TARGET}")) == set()  # published as if built: up to date


def test_an_upload_killed_before_its_manifest_is_no_entry_and_the_next_build_completes_it(
        s3_remote, targets, frozen_repo, tmp_path):
    server = s3_remote.server
    server.hold = lambda method, path: method == "PUT" and "/v1/entries/build/" in path
    env = store_env(tmp_path / "one", targets, frozen_repo, s3_remote)
    process = subprocess.Popen(doit_command(env, f"build:{TARGET}"), env={**os.environ, **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert server.held.wait(60), "the build never reached its manifest's upload"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    server.hold = None
    server.released.set()
    objects = s3_remote.objects()
    assert not [n for n in objects if n.startswith("v1/entries/build/")]  # its files are there, its entry is not
    build_dir = Path(env["TORCHAT_ARTIFACTS"]) / "build"
    assert not [d for d in build_dir.iterdir() if not d.name.startswith(".")]  # nor a local artifact
    result = run_doit(env, f"build:{TARGET}")
    assert ran(result) == {f"build:{TARGET}"} and calls(env).count("export") == 2
    name, manifest = s3_remote.entry("build")
    assert manifest["key"] in name
    blobs = s3_remote.objects()
    for out in manifest["outputs"].values():
        assert cache_remote.hashlib.sha256(blobs[f"v1/blobs/{out['sha256'][:2]}/{out['sha256']}"]).hexdigest() == \
            out["sha256"]


@pytest.mark.parametrize("mode", ["read-write", "read-only"])
def test_a_corrupted_remote_file_is_refused_rebuilt_and_repaired_only_in_read_write(
        remote, mode, targets, frozen_repo, tmp_path):
    one = store_env(tmp_path / "one", targets, frozen_repo, remote)
    run_doit(one, f"build:{TARGET}")
    _, manifest = remote.entry("build")
    (out,) = manifest["outputs"].values()
    blob = f"v1/blobs/{out['sha256'][:2]}/{out['sha256']}"
    good = remote.objects()[blob]
    remote.put(blob, bytes([good[0] ^ 0xFF]) + good[1:])  # same size, other bytes
    two = store_env(tmp_path / "two", targets, frozen_repo, remote, mode=mode)
    result = run_doit(two, f"build:{TARGET}")
    assert calls(two) == ["export"]  # its inputs came from the remote; the refused build was built here
    (line,) = warnings(result)
    assert f"build:{TARGET}" in line and "refused" in line and "model.pt2" in line
    assert published(two) == published(one)
    assert remote.objects()[blob] == (good if mode == "read-write" else bytes([good[0] ^ 0xFF]) + good[1:])


@pytest.mark.parametrize("fault", ["down", "slow"])
def test_a_down_or_slow_remote_builds_locally_with_one_warning(fault, s3_remote, targets, frozen_repo, tmp_path):
    env = store_env(tmp_path / "one", targets, frozen_repo, s3_remote)
    env["TORCHAT_REMOTE_CACHE_TIMEOUT"] = "1"
    if fault == "down":
        import socket

        with socket.socket() as sock:  # a port that nothing listens on
            sock.bind(("127.0.0.1", 0))
            env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{sock.getsockname()[1]}"
    else:
        s3_remote.server.delay = 3.0  # every answer comes after the timeout
    start = time.perf_counter()
    result = run_doit(env, f"build:{TARGET}")
    elapsed = time.perf_counter() - start
    s3_remote.server.delay = 0.0
    assert ran(result) == CHAIN and calls(env) == ["download", "convert", "quantize", "export"]
    (line,) = warnings(result)
    assert line.startswith("torchat: warning: the remote cache is unavailable, building locally"), line
    assert elapsed < 60 and store.check_artifact(next((Path(env["TORCHAT_ARTIFACTS"]) / "build").glob("*-alpha*")))


def test_two_stores_building_one_key_at_once_end_with_one_consistent_entry(remote, targets, frozen_repo, tmp_path):
    envs = [store_env(tmp_path / side, targets, frozen_repo, remote) for side in ("one", "two")]
    processes = [subprocess.Popen(doit_command(env, f"build:{TARGET}"), env={**os.environ, **env},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in envs]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert published(envs[0]) == published(envs[1])
    entries = remote.entries()
    assert sorted(n.split("/")[2] for n in entries) == ["build", "convert", "download", "quantize"]
    objects = remote.objects()
    for manifest in entries.values():
        for out in manifest["outputs"].values():
            data = objects[f"v1/blobs/{out['sha256'][:2]}/{out['sha256']}"]
            assert len(data) == out["size"] and cache_remote.hashlib.sha256(data).hexdigest() == out["sha256"]
    assert not [n for n in objects if ".tmp-" in n]
    verified = run_cache(envs[0], "verify")
    assert "4 entries, 0 bad" in verified.stdout


def _tampered(manifest: dict, how: str) -> dict:
    (out,) = manifest["outputs"].values()
    if how in ("escape", "absolute"):
        return {**manifest, "outputs": {"../../escaped.pt2" if how == "escape" else "/tmp/torchat-escaped.pt2": out}}
    # the key stays, the preimage says something else: the entry claims to be what it is not
    spec_ = {**manifest["preimage"]["spec"], "max_seq_len": 1}
    return {**manifest, "preimage": {**manifest["preimage"], "spec": spec_}}


@pytest.mark.parametrize("how", ["escape", "absolute", "preimage"])
def test_an_entry_with_files_outside_it_or_a_key_that_is_not_its_preimages_is_refused(
        how, remote, targets, frozen_repo, tmp_path):
    one = store_env(tmp_path / "one", targets, frozen_repo, remote)
    run_doit(one, f"build:{TARGET}")
    name, manifest = remote.entry("build")
    remote.put(name, json.dumps(_tampered(manifest, how)).encode())
    two = store_env(tmp_path / "two", targets, frozen_repo, remote, mode="read-only")
    result = run_doit(two, f"build:{TARGET}")
    assert calls(two) == ["export"]
    (line,) = warnings(result)
    assert "refused" in line and ("outside its directory" in line if how != "preimage" else "preimage" in line), line
    assert not list(tmp_path.rglob("escaped.pt2")) and not Path("/tmp/torchat-escaped.pt2").exists()
    assert published(two) == published(one)
    assert remote.objects()[name] == json.dumps(_tampered(manifest, how)).encode()  # read-only: left as it was
    assert "1 bad" in run_cache(two, "verify", check=False).stdout
    three = store_env(tmp_path / "three", targets, frozen_repo, remote, mode="read-write")
    assert "repairing the entry" in warnings(run_doit(three, f"build:{TARGET}"))[0]
    _, repaired = remote.entry("build")
    assert (repaired["preimage"], repaired["outputs"]) == (manifest["preimage"], manifest["outputs"])
    assert "4 entries, 0 bad" in run_cache(three, "verify").stdout


def test_credentials_never_appear_in_logs_manifests_or_errors(s3_remote, targets, frozen_repo, tmp_path):
    one = store_env(tmp_path / "one", targets, frozen_repo, s3_remote)
    outputs = [run_doit(one, f"build:{TARGET}")]
    two = store_env(tmp_path / "two", targets, frozen_repo, s3_remote, mode="read-only")
    outputs += [run_doit(two, f"build:{TARGET}"), run_cache(two, "status"), run_cache(two, "ls"),
                run_cache(two, "verify")]
    # errors: a dead endpoint, and a secret that also sits in the URL's would-be password place
    dead = {**store_env(tmp_path / "three", targets, frozen_repo, s3_remote), "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "TORCHAT_REMOTE_CACHE_TIMEOUT": "1"}
    outputs += [run_cache(dead, "ls", check=False), run_cache(dead, "pull", f"build:{TARGET}", check=False),
                run_doit(dead, f"build:{TARGET}")]
    outputs += [run_cache({**two, "TORCHAT_REMOTE_CACHE": f"s3://{ACCESS_KEY}:{SECRET}@bucket/x"}, "ls", check=False)]
    assert outputs[-1].returncode == 1 and "holds a user or password" in outputs[-1].stderr
    dead_ls, dead_pull, dead_build = outputs[-4:-1]
    assert dead_ls.returncode == dead_pull.returncode == 1 and "EndpointConnectionError" in dead_pull.stderr
    assert dead_ls.stderr.count("\n") == dead_pull.stderr.count("\n") == 1
    assert "the remote cache is unavailable" in dead_build.stderr
    texts = [r.stdout + r.stderr for r in outputs]
    texts += [p.read_text(errors="replace") for env in (one, two) for p in Path(env["TORCHAT_ARTIFACTS"]).rglob("*")
              if p.is_file()]
    texts += [data.decode(errors="replace") for data in s3_remote.objects().values()]
    for text in texts:
        assert SECRET not in text and ACCESS_KEY not in text


def test_cache_status_push_pull_ls_verify_and_gc(remote, targets, frozen_repo, tmp_path):
    one = store_env(tmp_path / "one", targets, frozen_repo, remote)
    run_doit({**one, "TORCHAT_REMOTE_CACHE": "off"}, f"build:{TARGET}")  # built with no remote
    assert remote.entries() == {}
    status = run_cache(one, "status", TARGET).stdout.splitlines()
    assert [line.split()[:2] for line in status[1:5]] == [["local", t] for t in
                                                          ["download:alpha", "convert:alpha", "quantize:alpha-q8-bf16",
                                                           f"build:{TARGET}"]]
    assert "4 artifacts pushed" in run_cache(one, "push", f"build:{TARGET}").stdout
    assert "0 artifacts pushed" in run_cache(one, "push").stdout  # the whole store: all there already
    assert all(line.startswith("both") for line in run_cache(one, "status").stdout.splitlines()[1:5])

    two = store_env(tmp_path / "two", targets, frozen_repo, remote, mode="read-only")
    # an empty store knows the keys through the remote's manifests
    assert all(line.startswith("remote") for line in run_cache(two, "status", TARGET).stdout.splitlines()[1:5])
    assert "4 artifacts pulled" in run_cache(two, "pull", f"build:{TARGET}").stdout
    assert calls(two) == [] and published(two) == published(one)
    assert ran(run_doit(two, f"build:{TARGET}")) == set()
    pull_missing = run_cache(two, "pull", "build:beta-q8-aoti", check=False)
    assert pull_missing.returncode == 1 and "is not in the remote cache" in pull_missing.stderr
    assert pull_missing.stderr.count("\n") == 1

    listing = run_cache(two, "ls").stdout
    assert TARGET in listing and "4 entries" in listing
    assert "4 entries, 0 bad" in run_cache(two, "verify").stdout
    name, manifest = remote.entry("convert")
    out = manifest["outputs"]["model.safetensors"]
    remote.put(f"v1/blobs/{out['sha256'][:2]}/{out['sha256']}", b"corrupt")
    verify = run_cache(two, "verify", check=False)
    assert verify.returncode == 1 and "BAD convert:alpha" in verify.stdout and "model.safetensors" in verify.stdout
    refused = run_cache(two, "verify", "--drop-bad", check=False)
    assert refused.returncode == 1 and "read-only" in refused.stderr
    assert "removed" in run_cache(one, "verify", "--drop-bad", check=False).stdout
    assert len(remote.entries()) == 3

    assert "removed 0 entries" in run_cache(one, "gc", "--older-than", "2000-01-01").stdout
    tomorrow = (datetime.date.today() + datetime.timedelta(days=2)).isoformat()
    assert "would remove 3 entries" in run_cache(one, "gc", "--older-than", tomorrow, "--dry-run").stdout
    assert len(remote.entries()) == 3
    gc = run_cache(one, "gc", "--older-than", tomorrow).stdout
    assert "removed 3 entries" in gc
    assert [n for n in remote.objects() if n.startswith(("v1/entries/", "v1/blobs/"))] == []
    bad_date = run_cache(one, "gc", "--older-than", "last week", check=False)
    assert bad_date.returncode == 2 and "30d" in bad_date.stderr and bad_date.stderr.count("\n") == 1


# the pieces, in process


@pytest.fixture
def no_config(tmp_path, monkeypatch):
    for name in (cache_config.URL_ENV, cache_config.MODE_ENV, cache_config.TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(cache_config.CONFIG_ENV, str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text("")
    return tmp_path / "config.toml"


def test_the_config_file_and_the_environment(no_config, monkeypatch):
    assert cache_config.load_cache_config() is None
    no_config.write_text('[cache]\nurl = "s3://bucket/prefix/"\nmode = "read-write"\ntimeout = 3\n'
                         '[cache.options]\nendpoint_url = "http://127.0.0.1:9000"\n')
    config = cache_config.load_cache_config()
    assert (config.url, config.mode, config.timeout) == ("s3://bucket/prefix", "read-write", 3.0)
    assert config.options == {"endpoint_url": "http://127.0.0.1:9000"} and config.writable
    monkeypatch.setenv(cache_config.URL_ENV, "file:///srv/cache")
    monkeypatch.setenv(cache_config.MODE_ENV, "read-only")
    config = cache_config.load_cache_config()
    assert (config.url, config.mode, config.writable) == ("file:///srv/cache", "read-only", False)
    monkeypatch.setenv(cache_config.URL_ENV, "off")
    assert cache_config.load_cache_config() is None


@pytest.mark.parametrize("text, message", [
    ('[cache]\nurl = "s3://b/p"\nmode = "rw"\n', "unknown cache mode"),
    ('[cache]\nurl = "/srv/cache"\n', "is not a URL; give its scheme"),
    ('[cache]\nurl = "s3://me:pw@b/p"\n', "holds a user or password"),
    ('[cache]\nurl = "s3://b/p"\n[cache.options]\nsecret = "x"\n', "credentials do not go in torchat's config"),
    ('[cache]\nurl = "s3://b/p"\n[cache.options.client_kwargs]\naws_secret_access_key = "x"\n', "credentials"),
    ('[cache]\nurl = "s3://b/p"\ntimeout = 0\n', "give seconds"),
    ('[cache]\nuri = "s3://b/p"\n', "has no key 'uri'"),
])
def test_config_mistakes_are_one_line_naming_the_fix(no_config, text, message):
    no_config.write_text(text)
    with pytest.raises(TorchatError, match=message) as error:
        cache_config.load_cache_config()
    assert "\n" not in str(error.value)


def test_redact_scrubs_secrets_url_passwords_and_signatures(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    text = (f"failed: {SECRET} at https://user:hunter2@host/x?X-Amz-Signature=abcdef&X-Amz-Credential=AKIA/x "
            "and\nmore")
    scrubbed = cache_config.redact(text)
    assert SECRET not in scrubbed and "hunter2" not in scrubbed and "abcdef" not in scrubbed and "\n" not in scrubbed


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "a\\..\\x", "", "manifest.json", "a//b", "./a"])
def test_file_names_outside_an_entry_are_refused(name):
    with pytest.raises(cache_remote.EntryRefused, match="outside its directory"):
        cache_remote.check_output_name(name)
    assert cache_remote.check_output_name("sub/model.pte") == "sub/model.pte"


def test_large_files_stream_in_chunks(tmp_path, monkeypatch):
    """A file of several chunks goes up and comes back without any read or write larger than a chunk."""
    monkeypatch.setattr(cache_remote, "STREAM_CHUNK", 1 << 16)
    data = os.urandom(5 * (1 << 16) + 123)
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "model.pte").write_bytes(data)
    digest = cache_remote.hashlib.sha256(data).hexdigest()
    preimage = {"step": "build", "format": 1}
    key = cache_remote.sha256_json(preimage)
    manifest = {"format": 1, "key": key, "step": "build", "name": "x", "preimage": preimage,
                "outputs": {"model.pte": {"sha256": digest, "size": len(data), "mtime_ns": 1}}}
    config = cache_config.CacheConfig(f"file://{tmp_path / 'remote'}", cache_config.Mode.READ_WRITE)
    cache = cache_remote.RemoteCache(config)
    sizes = []
    real_open = cache.fs.open

    def spying_open(*args, **kwargs):
        handle = real_open(*args, **kwargs)
        read = handle.read
        handle.read = lambda n=-1: sizes.append(n) or read(n)
        return handle

    cache.upload(artifact, manifest)
    shared = cache.manifest("build", key)
    assert "mtime_ns" not in shared["outputs"]["model.pte"]
    monkeypatch.setattr(cache.fs, "open", spying_open)
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    cache.download(shared, fetched)
    assert (fetched / "model.pte").read_bytes() == data
    assert len(sizes) >= 6 and max(sizes) <= 1 << 16 and -1 not in sizes

