"""Strict params: unknown keys and bad values are one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lowgrad.config import load_params, parse_params
from lowgrad.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _default() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.data.ood_names == ["digits_6to9", "photo_patches"]


@pytest.mark.parametrize(
    "path,value,expected",
    [
        (("subspace", "kk"), 3, r"subspace.kk: unknown key \(did you mean 'k'\?\)"),
        (("subspace", "kernal"), "nfk", r"subspace.kernal: unknown key \(did you mean 'kernel'\?\)"),
        (("seeed",), 1, r"seeed: unknown key \(did you mean 'seed'\?\)"),
        (("data", "datasets", "id_test", "sorce"), "x", r"data.datasets.id_test.sorce: unknown key"),
        (("subspace", "k"), 0, r"subspace.k: Input should be greater than 0"),
        (("subspace", "kernel"), "rbf", r"subspace.kernel: Input should be 'nfk' or 'ntk'"),
    ],
)
def test_bad_keys_and_values(path, value, expected):
    raw = _default()
    node = raw
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=expected) as info:
        parse_params(raw, "params.yaml")
    assert "\n" not in str(info.value)


def test_unknown_detector_and_option():
    raw = _default()
    raw["scoring"]["forward"]["knnn"] = {}
    with pytest.raises(ConfigError, match="unknown detector 'knnn'"):
        parse_params(raw)
    raw = _default()
    raw["scoring"]["gradient"]["knn"] = {"kk": 5}
    with pytest.raises(ConfigError, match=r"scoring.gradient.knn.kk: unknown option \(allowed: \['k'\]\)"):
        parse_params(raw)


def test_required_sets_and_paths():
    raw = _default()
    del raw["data"]["datasets"]["id_test"]
    with pytest.raises(ConfigError, match="needs an 'id_test' entry"):
        parse_params(raw)
    raw = _default()
    raw["data"]["datasets"]["cifar"] = {"source": "npz_jpeg"}
    with pytest.raises(ConfigError, match="data.datasets.cifar.path: Field required"):
        parse_params(raw)


def test_every_input_is_a_file_dvc_can_track():
    """Every set names its input (the bundled scikit-learn sources became committed files) and the checkpoint is
    a file: null no longer means 'train', which DVC could not key a stage by."""
    raw = _default()
    raw["data"]["datasets"]["old"] = {"source": "sklearn_digits", "classes": [7]}
    with pytest.raises(ConfigError, match=r"source 'sklearn_digits' is now a file .* \{source: npz, path: data/embedded/digits.npz\}"):
        parse_params(raw)
    raw = _default()
    raw["model"]["checkpoint"] = None
    with pytest.raises(ConfigError, match="model.checkpoint must name a file: a state_dict, or models/trained.pt"):
        parse_params(raw)
    raw = _default()
    raw["data"]["datasets"]["o"] = {"source": "npz", "path": "x.npz", "n": 5}
    with pytest.raises(ConfigError, match="'n' .* applies to source 'photo_patches' only"):
        parse_params(raw)
    params = parse_params(_default())
    assert params.model.trains and all(spec.path for spec in params.data.datasets.values())
    raw = _default()
    raw["model"]["checkpoint"] = "./models/trained.pt"
    assert parse_params(raw).model.trains
    raw["model"]["checkpoint"] = "ckpt/latest.pt"
    assert not parse_params(raw).model.trains


def test_pipeline_stages_validate_without_the_scoring_schema():
    """The stages before score validate everything but the scoring section, without importing its schema."""
    code = ("import sys; from lowgrad.config import load_params; p = load_params('params.yaml', scoring=False); "
            "assert isinstance(p.scoring, dict); assert 'lowgrad.options' not in sys.modules, 'options imported'; "
            "q = load_params('params.yaml'); assert type(q.scoring).__name__ == 'DetectorsConfig'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_overrides_and_missing_file(tmp_path):
    params = load_params(ROOT / "params.yaml", {"subspace.k": 7})
    assert params.subspace.k == 7
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
