"""lowgrad sets passive OpenMP waiting before torch starts its thread pool (docs/benchmarks.md, "Thread pools")."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# records OMP_WAIT_POLICY at the moment torch starts to import (its libgomp reads the variable when it loads)
PROBE = """
import importlib.abc, json, os, sys
seen = {{}}
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and "at_torch" not in seen:
            seen["at_torch"] = os.environ.get("OMP_WAIT_POLICY")
        return None
sys.meta_path.insert(0, Spy())
import {module}
print(json.dumps({{"policy": os.environ.get("OMP_WAIT_POLICY"), "torch": "torch" in sys.modules, **seen}}))
"""


def _probe(module: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], env=environ, capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["stages.score", "flows.pipeline"])
def test_a_stage_or_the_flow_sets_passive_waiting_before_torch_loads(module):
    assert _probe(module) == {"policy": "PASSIVE", "torch": True, "at_torch": "PASSIVE"}


def test_a_policy_the_user_set_is_kept_and_torch_alone_sets_none():
    assert _probe("lowgrad", OMP_WAIT_POLICY="ACTIVE")["policy"] == "ACTIVE"
    assert _probe("torch") == {"policy": None, "torch": True, "at_torch": None}  # the probe sees an unset policy
