"""Profiles: a params file that ``extends`` another states only its differences (docs/pipeline.md, "Profiles").

The rule (mappings merge, ``null`` removes, anything else replaces) is checked on small files against a
hand-written expectation; the committed profiles are checked to state nothing their base already says; and a
profile run by the flow writes a complete ``params.yaml`` (DVC keys the stages by it)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from lowgrad.config import EXTENDS, load_params, read_raw
from lowgrad.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if EXTENDS in yaml.safe_load(p.read_text()))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_merge_rule_on_small_files(tmp_path):
    _write(tmp_path / "base.yaml", """
seed: 0
data:
  mean: [0.5, 0.5]
  datasets:
    a: {source: npz, path: a.npz}
    b: {source: npz, path: b.npz, max_samples: 10}
    c: {source: npz, path: c.npz}
gradient: {sketch: kronecker, sketch_rank: 16}
""")
    _write(tmp_path / "mid.yaml", "extends: base.yaml\ngradient: {sketch_rank: 32}\nseed: 1\n")
    _write(tmp_path / "top.yaml", """
extends: mid.yaml
data:
  mean: [0.1]
  datasets:
    b: {max_samples: 5}
    c: null
    d: {source: npz, path: d.npz}
gradient: {sketch: null}
""")
    assert read_raw(tmp_path / "top.yaml") == {
        "seed": 1,  # from the middle file: a chain of three
        "data": {
            "mean": [0.1],  # a list replaces, it does not extend
            "datasets": {
                "a": {"source": "npz", "path": "a.npz"},
                "b": {"source": "npz", "path": "b.npz", "max_samples": 5},  # mappings merge key by key
                "d": {"source": "npz", "path": "d.npz"},  # c: null removed it
            },
        },
        "gradient": {"sketch_rank": 32},  # sketch: null removed the key (back to lowgrad's default)
    }
    # the files themselves are untouched by reading them (no extends popped from a cached copy)
    assert read_raw(tmp_path / "mid.yaml") == {**read_raw(tmp_path / "base.yaml"), "seed": 1,
                                               "gradient": {"sketch": "kronecker", "sketch_rank": 32}}


@pytest.mark.parametrize("files,start,message", [
    ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}, "a.yaml", "extend each other in a cycle"),
    ({"a.yaml": "extends: a.yaml\n"}, "a.yaml", "extend each other in a cycle"),
    ({"a.yaml": "extends: missing.yaml\n"}, "a.yaml", "extends: missing.yaml: no such params file"),
    ({"a.yaml": "extends: [b.yaml]\n"}, "a.yaml", "extends: must name a params file"),
    ({"params.yaml": "extends: a.yaml\n", "a.yaml": "seed: 0\n"}, "params.yaml", "params.yaml cannot use 'extends'"),
    ({"a.yaml": "extends: params.yaml\n", "params.yaml": "seed: 0\n"}, "a.yaml", "a profile cannot extend params.yaml"),
])
def test_a_bad_chain_is_one_line(tmp_path, files, start, message):
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(ConfigError, match=message) as err:
        read_raw(tmp_path / start)
    assert "\n" not in str(err.value)


def redundant_keys(own: dict[str, Any], base: dict[str, Any], where: str = "") -> list[str]:
    """The keys of a profile that change nothing: a value equal to the base's, or a ``null`` for an absent key."""
    found = []
    for key, value in own.items():
        if where == "" and key == EXTENDS:
            continue
        dotted = f"{where}{key}"
        if value is None and key not in base:
            found.append(f"{dotted}: null, but the base has no such key")
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            found += redundant_keys(value, base[key], dotted + ".")
        elif key in base and base[key] == value:
            found.append(f"{dotted}: {value!r}, as in the base")
    return found


def test_the_redundancy_check_finds_a_restated_value(tmp_path):  # negative control of the next test
    _write(tmp_path / "base.yaml", "seed: 0\ngradient: {sketch_rank: 16, batch_size: 8}\n")
    profile = {EXTENDS: "base.yaml", "seed": 0, "gradient": {"sketch_rank": 32, "batch_size": 8}, "x": None}
    assert redundant_keys(profile, read_raw(tmp_path / "base.yaml")) == [
        "seed: 0, as in the base", "gradient.batch_size: 8, as in the base", "x: null, but the base has no such key"]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_each_committed_profile_states_only_its_differences(profile):
    own = yaml.safe_load(profile.read_text())
    base = read_raw(profile.parent / own[EXTENDS])
    assert redundant_keys(own, base) == []
    load_params(profile)  # and the merged whole is a valid params file


def test_the_profiles_are_profiles():  # the point: the cpu and ImageNet files shrink to their differences
    assert {p.name for p in PROFILES} >= {"cifar10_resnet18_cpu.yaml", "imagenet_resnet50.yaml"}


def test_a_profile_run_writes_a_complete_params_yaml(tmp_path):
    """What the flow writes for a profile: no ``extends``, every merged value (and every key dvc.yaml tracks), the
    profile's comments on the values it changed, a header naming the chain; the stages' own reader accepts it."""
    from flows.pipeline import apply_params

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copytree(ROOT / "data" / "embedded", tmp_path / "data" / "embedded")
    shutil.copy(ROOT / "params.yaml", tmp_path / "base.yaml")
    (tmp_path / "params.yaml").write_text("seed: 0\n")  # whatever the workspace held before
    _write(tmp_path / "profile.yaml", "# my profile: a smaller k\nextends: base.yaml\n"
           "subspace:\n  k: 8                # the new k\ndata:\n  datasets:\n    photo_patches: null\n")
    apply_params("profile.yaml", {"seed": 3}, tmp_path)
    text = (tmp_path / "params.yaml").read_text()
    written = yaml.safe_load(text)
    assert EXTENDS not in written
    expected = read_raw(tmp_path / "profile.yaml")
    expected["seed"] = 3
    assert written == expected
    assert "k: 8                # the new k" in text
    assert text.startswith("# my profile: a smaller k\n# Written by flows.pipeline from profile.yaml, merged as "
                           "base.yaml -> profile.yaml")
    params = load_params(tmp_path / "params.yaml")
    assert params.subspace.k == 8 and params.data.ood_names == ["digits_6to9"]
