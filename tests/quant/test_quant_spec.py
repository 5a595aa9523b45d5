"""--quant parsing: the seed's spellings, normalisation, and clear errors for everything else."""

import json
import subprocess
import sys

import pytest

from torchat.errors import TorchatError
from torchat.quant import QuantSpec, parse_quant, specs_to_json
from torchat.quant.spec import SCHEME_ALIASES, SCHEME_OPTIONS


def test_seed_single_quoted_python_dict():
    specs = parse_quant("{'linear:int4': {'group_size' : 32} }")
    assert specs == [QuantSpec("linear:int4", {"group_size": 32, "head_bitwidth": 4})]


@pytest.mark.parametrize("text, want", [
    ('{"linear:int4": {"groupsize": 256}}', [QuantSpec("linear:int4", {"group_size": 256, "head_bitwidth": 4})]),
    ('{"linear:int8": {"bitwidth": 8, "groupsize": 0}}', [QuantSpec("linear:int8", {"bitwidth": 8, "group_size": 0})]),
    ('{"embedding": {"bitwidth": 4, "groupsize": 32}}', [QuantSpec("embedding", {"bitwidth": 4, "group_size": 32})]),
    ('{"embedding": {}}', [QuantSpec("embedding", {"bitwidth": 8, "group_size": 0})]),
    ('{"linear:a8w4dq": {"groupsize": 32}}', [QuantSpec("linear:8da4w", {"bitwidth": 4, "grid": "symmetric",
                                                                        "group_size": 32, "head_bitwidth": 4})]),
    ('{"linear:8da4w": {"grid": "asymmetric"}}', [QuantSpec("linear:8da4w", {"bitwidth": 4, "grid": "asymmetric",
                                                                            "group_size": 256, "head_bitwidth": 4})]),
    ('{"precision": {"dtype": "bfloat16"}}', [QuantSpec("precision", {"dtype": "bf16"})]),
    ("{}", []),
])
def test_seed_spellings_normalise(text, want):
    assert parse_quant(text) == want


def test_order_is_kept_and_torchchat_presets_parse():
    specs = parse_quant('{"linear:a8w4dq": {"groupsize": 32}, "embedding": {"bitwidth": 4, "groupsize": 32}}')
    assert [s.scheme for s in specs] == ["linear:8da4w", "embedding"]
    gptq = parse_quant('{"linear:int4-gptq": {"groupsize": 32, "calibration_limit": 8, "calibration_seq_length": 128}}')
    assert gptq[0].scheme == "linear:gptq"
    assert gptq[0].options["calibration_limit"] == 8 and gptq[0].options["group_size"] == 32


def test_two_spellings_give_equal_specs_and_json():
    a = parse_quant("{'linear:int4': {'groupsize': 64}}")
    b = parse_quant('{"linear:int4": {"group_size": 64}}')
    assert a == b and hash(a[0]) == hash(b[0])
    assert parse_quant(specs_to_json(a)) == a


def test_file_argument(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"linear:hqq": {"group_size": 64}}))
    assert parse_quant(str(path)) == [QuantSpec("linear:hqq", {"group_size": 64})]


@pytest.mark.parametrize("text, words", [
    ("{'linear:int4': ", ["not valid JSON"]),
    ("[1, 2]", ["expected a JSON object"]),
    ("no/such/file.json", ["neither a JSON object nor a readable file"]),
    ('{"linear:int5": {}}', ["unknown quantization scheme", "'linear:int5'", "embedding, linear:8da4w"]),
    ('{"linear:int4": {"group_size": 48}}', ["group_size = 48", "32, 64, 128, 256"]),
    ('{"linear:int4": {"groupsize": "32"}}', ["groupsize = '32'"]),
    ('{"linear:int4": {"inner_k_tiles": 8}}', ["unknown option 'inner_k_tiles'", "allowed: group_size"]),
    ('{"linear:int4": {"groupsize": 32, "group_size": 32}}', ["given twice"]),
    ('{"linear:int8": {"bitwidth": 4}}', ["bitwidth = 4", "one of 8"]),
    ('{"embedding": {"bitwidth": 4, "group_size": 0}}', ["bitwidth 4 needs a group_size"]),
    ('{"precision": {"dtype": "fp8"}}', ["dtype = 'fp8'", "fp32, bf16, fp16"]),
    ('{"linear:8da4w": {}, "linear:a8w4dq": {}}', ["given twice"]),
    ('{"linear:int4": 32}', ["must be an object"]),
])
def test_bad_quant_fails_clearly(text, words):
    with pytest.raises(TorchatError) as error:
        parse_quant(text)
    for word in words:
        assert word in str(error.value)


def test_unknown_scheme_lists_every_choice_sorted():
    with pytest.raises(TorchatError) as error:
        parse_quant('{"linear:fp8": {}}')
    listed = str(error.value).split("choose one of: ")[1].split(", ")
    assert listed == sorted(list(SCHEME_OPTIONS) + list(SCHEME_ALIASES))


def test_registry_and_option_schemas_agree():
    from torchat.quant import QUANTIZERS

    assert sorted(QUANTIZERS) == sorted(SCHEME_OPTIONS)


def test_parsing_does_not_import_torch():
    """The build graph validates presets with the standard library only."""
    code = ("import sys; from torchat.quant import parse_quant; parse_quant('{\"linear:int4\": {}}'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
