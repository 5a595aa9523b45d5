"""The artifact store: keys, manifests, atomic publication, and what counts as done.

Graph tests run the steps through a stand-in for `python -m torchat` ($TORCHAT_STEP_CLI, STUB below) that
writes small deterministic outputs, so that they exercise the graph, not the verbs; `download` fetches for real
(the library function that `torchat download MODEL --output-dir DIR` runs).
"""

import hashlib
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from torchat import spec, store
from torchat.errors import TorchatError
from torchat.spec.toolchain import compiled_code_target

STUB = textwrap.dedent('''
    """A stand-in for `python -m torchat`: deterministic outputs from the inputs' bytes and the arguments."""
    import hashlib, os, sys, time
    from pathlib import Path

    verb, args = sys.argv[1], sys.argv[2:]
    if verb == "download":
        from torchat.sources import fetch_model_files
        from torchat.spec import load_catalog

        output_dir = Path(args[args.index("--output-dir") + 1])
        fetch_model_files(load_catalog().model(args[0]), output_dir, os.environ.get("TORCHAT_ALLOW_UNPINNED") == "1")
        sys.exit(0)
    with open(os.environ["STUB_LOG"], "a") as log:
        log.write(verb + "\\n")
    options = dict(zip(args[::2], args[1::2]))
    digest = hashlib.sha256(verb.encode())
    for flag, value in sorted(options.items()):
        path = Path(value)
        if flag in ("--checkpoint-path", "--checkpoint-dir", "--artifact-dir"):
            for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if f.is_file() and f.name != "manifest.json":
                    digest.update(f.read_bytes())
        elif not flag.startswith("--output"):
            digest.update(f"{flag}={value}".encode())
    payload = digest.hexdigest().encode()
    out = options.get("--output-dir")
    files = {"convert": ["model.safetensors", "model_args.json"], "quantize": ["model.safetensors"]}.get(verb)
    if out is None:
        out_file = Path(next(v for k, v in options.items() if k.startswith("--output")))
        out, files = out_file.parent, [out_file.name]
    files = files or ["result.json"]
    Path(out).mkdir(parents=True, exist_ok=True)
    if os.environ.get("STUB_FAIL") == verb:
        sys.exit("stub: failing on purpose")
    if os.environ.get("STUB_SLEEP") == verb:
        with open(Path(out) / files[0], "wb") as f:
            f.write(payload[:8])
            f.flush()
            time.sleep(60)
    for name in files:
        (Path(out) / name).write_bytes(payload + name.encode())
''')


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tiny_targets(root: Path, contents: dict[str, bytes] | None = None, q8_groupsize: int = 0) -> Path:
    """A targets dir with two models from `path:` files (pinned), two quant presets and three backends."""
    root.mkdir(parents=True, exist_ok=True)
    contents = contents or {"alpha": b"alpha weights", "beta": b"beta weights"}
    (root / "tok.model").write_bytes(b"tokenizer")
    models = []
    for key, data in contents.items():
        (root / f"{key}.bin").write_bytes(data)
        models.append(f'[{key}]\nconfig = "stories15M"\nformat = "llama2c"\nsource = "path:{key}.bin"\n'
                      f'sha256 = "{sha256(data)}"\n'
                      f'tokenizer = {{ source = "path:tok.model", sha256 = "{sha256(b"tokenizer")}" }}\n')
    (root / "models.toml").write_text("\n".join(models))
    (root / "quant.toml").write_text(f'[none]\nquant = {{}}\n\n[q8]\n'
                                     f'quant = {{ embedding = {{ bitwidth = 8, groupsize = {q8_groupsize} }} }}\n')
    (root / "matrix.toml").write_text(textwrap.dedent('''
        [defaults]
        model = "alpha"
        [[matrix]]
        models = "*"
        quants = "*"
        backends = "*"
    '''))
    return root


def graph_env(tmp_path: Path) -> dict[str, str]:
    """Environment for graph runs in tmp_path: tiny targets, private store, cache, doit db and the stub CLI."""
    stub = tmp_path / "stub_torchat.py"
    stub.write_text(STUB)
    return {"TORCHAT_TARGETS_DIR": str(tmp_path / "targets"), "TORCHAT_ARTIFACTS": str(tmp_path / "artifacts"),
            "TORCHAT_CACHE": str(tmp_path / "cache"), "TORCHAT_DOIT_DB": str(tmp_path / "doit.db"),
            "TORCHAT_STEP_CLI": f"{sys.executable} {stub}", "STUB_LOG": str(tmp_path / "stub.log")}


def stub_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "stub.log"
    return log.read_text().split() if log.exists() else []


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    write_tiny_targets(tmp_path / "targets")
    for key, value in graph_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(store, "_found", {})
    return spec.load_catalog()


def test_realize_publishes_a_manifest_with_the_whole_preimage(tiny, tmp_path):
    target = tiny.parse_target("alpha-q8-aoti")
    directory, manifest = store.realize_with_inputs(tiny.build_node(target))
    assert directory.parent == tmp_path / "artifacts" / "build"
    assert directory.name == f"{manifest['key'][:16]}-alpha-q8-aoti"
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.pt2"]
    assert manifest["key"] == store.sha256_json(manifest["preimage"])
    pre = manifest["preimage"]
    # an AOTI build is compiled -march=native, so its key names the compiler and the CPU's ISA (test_spec checks it)
    assert pre["spec"] == {"backend": "aoti", "device": "cpu", "dtype": "bf16", "max_seq_len": 256,
                           "native": compiled_code_target()}
    assert set(pre["inputs"]) == {"checkpoint"} and "model.safetensors" in pre["inputs"]["checkpoint"]["outputs"]
    assert "torchat/model.py" in pre["code"] and {"python", "torch", "torchao"} <= set(pre["toolchain"])
    out = manifest["outputs"]["model.pt2"]
    assert out["sha256"] == store.sha256_file(directory / "model.pt2")
    assert stub_calls(tmp_path) == ["convert", "quantize", "export"]  # download ran the real verb
    assert manifest["inputs"]["checkpoint"].startswith("quantize/")


def test_a_second_realize_runs_nothing(tiny, tmp_path):
    node = tiny.build_node(tiny.parse_target("alpha-none-aoti"))
    first = store.realize_with_inputs(node)
    store._found.clear()
    assert store.find(node) == first
    assert store.realize(node) == first
    assert stub_calls(tmp_path) == ["convert", "quantize", "export"]


def test_the_quantized_checkpoint_is_shared_by_backends_of_one_dtype(tiny, tmp_path):
    eager, aoti = (tiny.parse_target(n) for n in ("alpha-q8-eager", "alpha-q8-aoti"))
    assert tiny.model_node(eager) is tiny.quantize_node(aoti.model, aoti.quant, aoti.dtype)
    store.realize_with_inputs(tiny.build_node(aoti))
    assert store.is_done(tiny.build_node(eager))
    assert stub_calls(tmp_path).count("quantize") == 1


def test_a_directory_without_a_valid_manifest_is_not_done(tiny, tmp_path):
    node = tiny.quantize_node(tiny.models["alpha"], tiny.quants["q8"], spec.Dtype.BF16)
    directory, manifest = store.realize_with_inputs(node)
    (directory / "manifest.json").unlink()
    store._found.clear()
    assert not store.is_done(node)
    directory2, _ = store.realize_with_inputs(node)
    assert directory2 == directory and store.check_artifact(directory, manifest["key"])
    (directory / "manifest.json").write_text("{not json")
    store._found.clear()
    assert not store.is_done(node)


def test_changed_output_bytes_are_caught_but_a_touch_is_not_a_change(tiny):
    node = tiny.quantize_node(tiny.models["alpha"], tiny.quants["none"], spec.Dtype.BF16)
    directory, manifest = store.realize_with_inputs(node)
    weights = directory / "model.safetensors"
    os.utime(weights, ns=(1, 1))
    assert store.check_artifact(directory, manifest["key"]) == manifest
    data = weights.read_bytes()
    weights.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, other content
    assert store.check_artifact(directory, manifest["key"]) is None


def test_a_failing_verb_publishes_nothing(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_FAIL", "quantize")
    node = tiny.build_node(tiny.parse_target("alpha-q8-aoti"))
    with pytest.raises(TorchatError, match="exited with status 1; quantize:alpha-q8-bf16 was not built"):
        store.realize_with_inputs(node)
    assert list((tmp_path / "artifacts" / "quantize").iterdir()) == [
        tmp_path / "artifacts" / "quantize" / f".lock-{_quantize_key16(tiny)}"]


def _quantize_key16(catalog) -> str:
    return store.node_key(catalog.quantize_node(catalog.models["alpha"], catalog.quants["q8"], spec.Dtype.BF16))[:16]


def test_a_verb_that_does_not_exist_yet_fails_naming_its_issue(tiny, monkeypatch):
    monkeypatch.delenv("TORCHAT_STEP_CLI")
    node = spec.Node(spec.Step.QUANTIZE, "alpha-q8-bf16", "{}", (), (), "no-such-verb", (), (), "alpha")
    with pytest.raises(TorchatError, match=r"`torchat no-such-verb` does not exist yet \(the quantization issue"):
        store.realize_with_inputs(node)


def test_leftovers_of_a_killed_build_are_swept_and_never_read(tiny, tmp_path):
    node = tiny.quantize_node(tiny.models["alpha"], tiny.quants["q8"], spec.Dtype.BF16)
    store.realize_with_inputs(tiny.convert_node(tiny.models["alpha"]))
    key16 = store.node_key(node)[:16]
    stale = tmp_path / "artifacts" / "quantize" / f".tmp-{key16}-killed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    assert not store.is_done(node)
    directory, _ = store.realize_with_inputs(node)
    assert not stale.exists() and directory.name.startswith(key16)


def test_keys_follow_spec_inputs_code_and_toolchain_but_not_names(tiny, tmp_path, monkeypatch):
    convert = tiny.convert_node(tiny.models["alpha"])
    store.realize_with_inputs(convert)
    q8, none = (tiny.quantize_node(tiny.models["alpha"], tiny.quants[q], spec.Dtype.BF16) for q in ("q8", "none"))
    assert store.node_key(q8) != store.node_key(none)
    renamed = spec.Node(**{**q8.__dict__, "name": "other-name"})
    assert store.node_key(renamed) == store.node_key(q8)
    key = store.node_key(q8)
    monkeypatch.setitem(store._version_cache, "torchao", "0.0.0")
    assert store.node_key(q8) != key


def test_code_digests_hash_files_and_directories(tmp_path):
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("a = 1\n")
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "one.py").write_text("x = 2\n")
    digests = store.code_digests(("pkg", "one.py", "missing.py"), root=tmp_path)
    assert digests == {"pkg/a.py": sha256(b"a = 1\n"), "one.py": sha256(b"x = 2\n"), "missing.py": "absent"}


def test_toolchain_versions_come_from_metadata():
    versions = store.toolchain_versions(("torch", "no-such-distribution-xyz"))
    assert versions["torch"].startswith("2.") and versions["no-such-distribution-xyz"] == "absent"
    assert "python" in versions and store.toolchain_versions(()) == {}


def test_remove_named_removes_every_key_of_a_name(tiny, tmp_path):
    node = tiny.quantize_node(tiny.models["alpha"], tiny.quants["none"], spec.Dtype.BF16)
    directory, _ = store.realize_with_inputs(node)
    old = directory.parent / f"{'0' * 16}-{node.name}"
    old.mkdir()
    assert sorted(store.remove_named(node)) == sorted([directory, old])
    assert not directory.exists() and not old.exists() and not store.is_done(node)
    assert json.loads(json.dumps(store.artifacts("quantize"))) == []


def test_presets_are_normalised_before_they_are_hashed(tiny, tmp_path):
    """`groupsize` and `group_size` (and an option left at its default) are one preset: one store key."""
    spelled = {"one": "quant = { embedding = { bitwidth = 8, groupsize = 32 } }",
               "other": "quant = { embedding = { group_size = 32 } }"}
    keys = set()
    for name, preset in spelled.items():
        root = write_tiny_targets(tmp_path / name)
        (root / "quant.toml").write_text(f"[none]\nquant = {{}}\n\n[q8]\n{preset}\n")
        catalog = spec.load_catalog(root)
        store.realize_with_inputs(catalog.convert_node(catalog.models["alpha"]))
        node = catalog.quantize_node(catalog.models["alpha"], catalog.quants["q8"], spec.Dtype.BF16)
        keys.add(store.node_key(node))
    assert len(keys) == 1 and None not in keys

