"""lowgrad sets passive OpenMP waiting before torch starts its thread pool (docs/benchmarks.md, "Thread pools")."""

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, os, sys
import {module}
mods = list(sys.modules)
print(json.dumps({{"policy": os.environ.get("OMP_WAIT_POLICY"), "torch": "torch" in mods,
                  "lowgrad_first": "torch" in mods and "lowgrad" in mods and mods.index("lowgrad") < mods.index("torch")}}))
"""


def _probe(module: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], env=environ, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["stages.score", "flows.pipeline"])
def test_a_stage_or_the_flow_waits_passively_and_sets_it_before_torch_loads(module):
    seen = _probe(module)
    assert seen == {"policy": "PASSIVE", "torch": True, "lowgrad_first": True}


def test_a_policy_the_user_set_is_kept_and_torch_alone_sets_none():
    assert _probe("lowgrad", OMP_WAIT_POLICY="ACTIVE")["policy"] == "ACTIVE"
    assert _probe("torch")["policy"] is None  # the probe sees an unset policy: lowgrad is what sets it
