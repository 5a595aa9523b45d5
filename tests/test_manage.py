"""`torchat download|list|where|remove` on tiny `path:` models."""

import os
import shutil
import subprocess
import sys

import pytest
from test_store import graph_env, sha256, write_tiny_targets

from torchat import pins, spec, store
from torchat.cli import main


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    write_tiny_targets(tmp_path / "targets")
    for key, value in graph_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(store, "_found", {})
    return spec.load_catalog()


def unpin(tmp_path):
    models = tmp_path / "targets" / "models.toml"
    models.write_text(models.read_text().replace(f'sha256 = "{sha256(b"beta weights")}"', 'sha256 = "unpinned"'))


def test_download_to_a_directory_fetches_verified_files(tiny, tmp_path):
    assert main(["download", "alpha", "--output-dir", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alpha.bin", "tok.model"]
    assert (tmp_path / "out" / "alpha.bin").read_bytes() == b"alpha weights"
    assert (tmp_path / "cache" / "files" / sha256(b"alpha weights") / "alpha.bin").is_file()


def test_download_publishes_what_doit_download_publishes(tiny, tmp_path, capsys):
    assert main(["download", "alpha"]) == 0
    directory, manifest = store.find(tiny.download_node(tiny.models["alpha"]))
    assert capsys.readouterr().out.split() == [str(directory / "alpha.bin"), str(directory / "tok.model")]
    assert manifest["outputs"]["alpha.bin"]["sha256"] == sha256(b"alpha weights")
    assert main(["where", "alpha"]) == 0 and capsys.readouterr().out.strip() == str(directory)


def test_unpinned_files_are_pinned_on_first_use_and_replaced_only_when_allowed(tiny, tmp_path, capsys):
    unpin(tmp_path)
    assert main(["download", "beta", "--output-dir", str(tmp_path / "out")]) == 0
    assert pins.read_pins(tmp_path / "targets") == {"path:beta.bin": sha256(b"beta weights")}
    (tmp_path / "targets" / "beta.bin").write_bytes(b"beta weights, changed upstream")
    shutil.rmtree(tmp_path / "cache")  # as on another machine
    capsys.readouterr()
    assert main(["download", "beta", "--output-dir", str(tmp_path / "out2")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pass --allow-unpinned to accept them and replace the pin" in error
    assert main(["download", "beta", "--output-dir", str(tmp_path / "out3"), "--allow-unpinned"]) == 0
    assert pins.read_pins(tmp_path / "targets") == {"path:beta.bin": sha256(b"beta weights, changed upstream")}
    assert main(["download", "beta"]) == 0  # into the store, under the key of the recorded pin
    assert store.find(spec.load_catalog().download_node(spec.load_catalog().models["beta"]))


def test_unknown_models_list_the_choices(tiny, capsys):
    assert main(["download", "gamma"]) == 1
    assert "unknown model 'gamma'; choose one of: alpha, beta" in capsys.readouterr().err
    assert main(["where", "alpha-q9-aoti"]) == 1
    assert "unknown quant preset 'q9'; choose one of: none, q8" in capsys.readouterr().err


def test_list_shows_known_and_built(tiny, capsys):
    store.realize_with_inputs(tiny.build_node(tiny.parse_target("alpha-q8-aoti")))
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "FORMAT", "CONFIG", "FILES", "DOWNLOADED"]
    assert lines[1].split() == ["alpha", "(default)", "llama2c", "stories15M", "pinned", "yes"]
    assert "built: build:alpha-q8-aoti, convert:alpha, quantize:alpha-q8-bf16" in lines[2]
    assert lines[3].split()[-1] == "no"  # beta
    assert "2 models, 12 targets in the matrix" in out


def test_where_names_the_models_artifact_and_says_how_to_build(tiny, capsys):
    assert main(["where", "alpha-none-aoti"]) == 1
    assert "build:alpha-none-aoti is not built (for its current key); run `doit build:alpha-none-aoti`" in \
        capsys.readouterr().err
    store.realize_with_inputs(tiny.build_node(tiny.parse_target("alpha-none-aoti")))
    for name, step in [("alpha-none-aoti", "build"), ("alpha-none-eager", "quantize")]:
        assert main(["where", name]) == 0
        assert capsys.readouterr().out.strip().startswith(str(tmp_artifacts(step)))
    assert main(["where", "alpha", "--step", "convert"]) == 0
    assert capsys.readouterr().out.strip().endswith("-alpha")
    assert main(["where"]) == 0 and capsys.readouterr().out.strip() == str(store.artifacts_dir())


def tmp_artifacts(step):
    return store.artifacts_dir() / step


def test_remove_a_target_then_a_model(tiny, tmp_path, capsys):
    store.realize_with_inputs(tiny.build_node(tiny.parse_target("alpha-none-aoti")))
    store.realize_with_inputs(tiny.build_node(tiny.parse_target("beta-none-aoti")))
    assert main(["remove", "alpha-none-aoti"]) == 0
    assert capsys.readouterr().out.count("removed") == 1
    store._found.clear()
    assert not store.is_done(tiny.build_node(tiny.parse_target("alpha-none-aoti")))
    assert store.is_done(tiny.quantize_node(tiny.models["alpha"], tiny.quants["none"], spec.Dtype.BF16))
    assert main(["remove", "alpha"]) == 0
    assert {d.name[17:] for d, _ in store.artifacts()} == {"beta", "beta-none-bf16", "beta-none-aoti"}
    assert not (tmp_path / "cache" / "files" / sha256(b"alpha weights")).exists()
    assert main(["remove", "alpha"]) == 0 and "nothing of alpha is stored" in capsys.readouterr().out


def test_list_does_not_import_torch(tiny):
    code = ("import sys\nfrom torchat.cli import main\nrc = main(['list'])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
