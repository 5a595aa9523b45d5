"""Location independence: the same step with the same inputs gives the same key and byte-identical files in any
store. The real verbs build download -> convert -> quantize (-> an eager build, which is the quantized checkpoint,
or an AOTI .pt2) on a random stories15M-shaped llama2.c checkpoint in two empty stores (other artifact, cache and
frozen code directories, other temp and inductor cache directories), and every file of every step is compared byte
for byte. A remote cache can only hit when this holds.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_dodo import copy_repo, doit_command, ran
from test_store import graph_env
from tiny_model import write_stories_targets

from torchat import store

# 8da4w, run eagerly: its build is the quantized checkpoint. A lowered tiny-8da4w-et was byte-identical too but
# takes minutes per store on two cores
EAGER = "tiny-8da4w-eager"
EAGER_CHAIN = {"download:tiny", "convert:tiny", "quantize:tiny-8da4w-bf16"}
# the AOTI package of the unquantized model: inductor compiles C++ in the temp and inductor cache directories
AOTI = "tiny-none-aoti"
AOTI_CHAIN = {"download:tiny", "convert:tiny", "build:tiny-none-aoti"}


def store_files(artifacts: Path) -> dict[str, bytes]:
    """Every published file under a store, by its path relative to the store (temporaries and locks left out)."""
    return {p.relative_to(artifacts).as_posix(): p.read_bytes() for p in sorted(artifacts.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(artifacts).parts)}


def without_local_facts(manifest: dict) -> dict:
    """A manifest less what only says when and how a copy was written: its time and its files' mtimes."""
    outputs = {name: {k: v for k, v in out.items() if k != "mtime_ns"} for name, out in manifest["outputs"].items()}
    return {**{k: v for k, v in manifest.items() if k != "created"}, "outputs": outputs}


def build_in_two_stores(tmp_path: Path, targets: Path, target: str, chain: set[str]) -> dict[str, dict[str, bytes]]:
    """`doit build:target` with the real verbs in two empty stores, each with its own frozen code, temp directory
    and inductor cache; side -> that store's files."""
    stores = {}
    for side in ("one", "two"):
        repo = copy_repo(tmp_path / side / "repo")  # a frozen copy: code digests enter the keys
        scratch = {"TMPDIR": tmp_path / side / "tmp", "TORCHINDUCTOR_CACHE_DIR": tmp_path / side / "inductor"}
        for directory in scratch.values():
            directory.mkdir(parents=True)
        env = {**graph_env(tmp_path / side), "TORCHAT_TARGETS_DIR": str(targets), "PYTHONPATH": str(repo),
               **{name: str(directory) for name, directory in scratch.items()}}
        del env["TORCHAT_STEP_CLI"]  # the real verbs
        start = time.perf_counter()
        result = subprocess.run(doit_command(env, f"build:{target}", dodo=repo / "dodo.py"),
                                env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout + result.stderr
        print(f"{target} in store {side}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        assert chain <= ran(result), result.stdout
        stores[side] = store_files(Path(env["TORCHAT_ARTIFACTS"]))
    return stores


def assert_byte_identical(tmp_path: Path, one: dict[str, bytes], two: dict[str, bytes], steps: set[str]) -> None:
    assert sorted(one) == sorted(two)  # the same keys: every directory name holds its key
    manifests = [name for name in one if name.endswith("/" + store.MANIFEST)]
    assert {name.split("/")[0] for name in manifests} == steps
    for name in sorted(one):
        if name in manifests:
            assert without_local_facts(json.loads(one[name])) == without_local_facts(json.loads(two[name])), name
        else:
            assert one[name] == two[name], f"{name} differs between the two stores"
    for name, data in one.items():  # nothing in any file names where either store (or the targets) lies
        assert str(tmp_path).encode() not in data, f"{name} records a path of this machine"


@pytest.mark.slow
def test_a_chain_built_in_two_stores_is_byte_identical(tmp_path, mistral_sentencepiece):
    targets = write_stories_targets(tmp_path / "targets", mistral_sentencepiece,
                                    {"8da4w": '{ "linear:a8w4dq" = { groupsize = 32 } }'}, backends='["eager"]')
    stores = build_in_two_stores(tmp_path, targets, EAGER, EAGER_CHAIN)
    assert_byte_identical(tmp_path, stores["one"], stores["two"], {"download", "convert", "quantize"})


@pytest.mark.slow
def test_an_aoti_package_built_in_two_stores_is_byte_identical(tmp_path, mistral_sentencepiece):
    """The .pt2 holds inductor's generated sources and the .so compiled from them, which would name the temp and
    inductor cache directories (torchat.lowering.aoti); its entries are stored uncompressed, so the search for
    this test's paths reads the .so's bytes too."""
    targets = write_stories_targets(tmp_path / "targets", mistral_sentencepiece, backends='["aoti"]')
    stores = build_in_two_stores(tmp_path, targets, AOTI, AOTI_CHAIN)
    packages = [name for name in stores["one"] if name.endswith(".pt2")]
    assert len(packages) == 1 and packages[0].startswith("build/"), sorted(stores["one"])
    assert_byte_identical(tmp_path, stores["one"], stores["two"], {"download", "convert", "quantize", "build"})
