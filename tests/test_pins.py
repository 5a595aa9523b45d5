"""Pin on first use: a model file that models.toml leaves unpinned is pinned by its first download in the
targets' pins.lock; later downloads must match it, and only --allow-unpinned replaces it. Every lock here lives in
a temporary targets directory, never in the checkout's targets/."""

import json
import shutil

import pytest
from test_store import sha256, write_tiny_targets

from torchat import pins, sources, spec
from torchat.errors import TorchatError


@pytest.fixture
def targets(tmp_path, monkeypatch):
    """Tiny targets whose model beta is unpinned in models.toml; a private cache."""
    monkeypatch.setenv("TORCHAT_CACHE", str(tmp_path / "cache"))
    root = write_tiny_targets(tmp_path / "targets")
    models = root / "models.toml"
    models.write_text(models.read_text().replace(f'sha256 = "{sha256(b"beta weights")}"', 'sha256 = "unpinned"'))
    return root


def beta(root):
    return spec.load_catalog(root).models["beta"]


def test_the_first_download_pins_the_file_and_the_catalog_reads_the_pin(targets, tmp_path, capsys):
    assert not beta(targets).pinned and not (targets / pins.LOCK_NAME).exists()
    unpinned_key = spec.load_catalog(targets).download_node(beta(targets)).spec
    paths = sources.fetch_model_files(beta(targets), tmp_path / "out", allow_unpinned=False)
    assert [p.read_bytes() for p in paths] == [b"beta weights", b"tokenizer"]
    assert f"pinned path:beta.bin to sha256 {sha256(b'beta weights')}" in capsys.readouterr().err
    assert json.loads((targets / pins.LOCK_NAME).read_text()) == {
        "format": 1, "sha256": {"path:beta.bin": sha256(b"beta weights")}}  # tok.model is pinned in models.toml
    model = beta(targets)
    assert model.pinned and model.files[0].sha256 == sha256(b"beta weights") and model.files[0].locked
    assert spec.load_catalog(targets).download_node(model).spec != unpinned_key  # the key uses the pin
    sources.fetch_model_files(model, tmp_path / "again", allow_unpinned=False)  # matches: nothing to say
    assert "pinned" not in capsys.readouterr().err


def test_other_bytes_are_refused_in_one_line_and_replace_the_pin_only_when_allowed(targets, tmp_path):
    sources.fetch_model_files(beta(targets), tmp_path / "out", allow_unpinned=False)
    (targets / "beta.bin").write_bytes(b"beta weights, changed upstream")
    assert sources.fetch_model_files(beta(targets), tmp_path / "cached", False)[0].read_bytes() == b"beta weights"
    shutil.rmtree(tmp_path / "cache")  # as on another machine: the file is downloaded again
    with pytest.raises(TorchatError) as error:
        sources.fetch_model_files(beta(targets), tmp_path / "out2", allow_unpinned=False)
    message = str(error.value)
    assert "\n" not in message and "--allow-unpinned" in message and sha256(b"beta weights") in message
    assert pins.read_pins(targets) == {"path:beta.bin": sha256(b"beta weights")}
    paths = sources.fetch_model_files(beta(targets), tmp_path / "out3", allow_unpinned=True)
    assert paths[0].read_bytes() == b"beta weights, changed upstream"
    assert pins.read_pins(targets) == {"path:beta.bin": sha256(b"beta weights, changed upstream")}
    assert beta(targets).files[0].sha256 == sha256(b"beta weights, changed upstream")


def test_a_models_toml_pin_is_never_replaced(targets, tmp_path):
    (targets / "alpha.bin").write_bytes(b"alpha weights, changed upstream")
    alpha = spec.load_catalog(targets).models["alpha"]
    with pytest.raises(TorchatError, match="sha256 mismatch"):
        sources.fetch_model_files(alpha, tmp_path / "out", allow_unpinned=True)
    assert not (targets / pins.LOCK_NAME).exists()


def test_a_broken_lock_names_itself(targets):
    (targets / pins.LOCK_NAME).write_text('{"format": 1, "sha256": {"path:beta.bin": "abc"}}')
    with pytest.raises(TorchatError, match="pins.lock: not a pin lock"):
        spec.load_catalog(targets)
