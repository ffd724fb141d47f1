"""The device run's script (bench/device.py) dry-run on the CPU: every part's plan passes the flow's --check, and
the command it would run on the device is the matrix-free exact route on CUDA at the paper's sizes."""

from __future__ import annotations

import pytest

from bench import device
from tests.conftest import shared_file


def test_each_part_runs_the_matrix_free_exact_route_on_cuda_and_checks_on_the_cpu():
    for part in device.PARTS.values():
        run = device.command(part, [], check=False)
        assert "--check" not in run and "device=cuda" in run
        assert {"gradient.sketch=none", "subspace.method=exact_randomized"} <= set(run)
        check = device.command(part, ["seed=3"], check=True)
        assert check[-1] == "--check" and "device=cpu" in check and "device=cuda" not in check and "seed=3" in check
    assert device.PARTS["authors"].params_file == "configs/cifar10_resnet18_authors.yaml"


@pytest.mark.shared
@pytest.mark.slow  # three flow --check runs: about 25 s each on 2 busy cores
def test_every_part_passes_check_on_this_cpu(capsys):
    shared_file("models/resnet18_cifar10_seed0.pt")
    assert device.main(["check"]) == 0
    # negative control: a part whose plan the flow refuses fails the dry-run with one error line
    assert device.main(["check", "gpu_profile", "--set", "subspace.k=0"]) != 0
    assert "error: bench.device: part gpu_profile does not pass --check" in capsys.readouterr().err


def test_a_call_cut_off_by_its_time_limit_brings_back_only_what_it_wrote(tmp_path):
    """``timeout`` sends SIGTERM: the run unwinds, collects and records rc 124; a file written before the call
    (the committed report of another run) is not passed off as this part's."""
    import json
    import subprocess
    import sys
    import textwrap

    from tests.conftest import ROOT

    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from bench import device
        device.command = lambda part, extra, check: [sys.executable, "-c", "import time; time.sleep(30)"]
        sys.exit(device.main(["run", "gpu_profile", "--out", {str(tmp_path)!r}]))
    """)
    done = subprocess.run(["timeout", "-s", "TERM", "5", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 124, done.stderr  # stopped by the time limit, not by the 30 s sleep ending
    record = json.loads((tmp_path / "gpu_profile/device.json").read_text())
    assert record["rc"] == 124 and "report/metrics.json" not in record["written_this_call"]
    assert not (tmp_path / "gpu_profile/report/metrics.json").exists()  # the committed file predates the call


def test_the_smoke_part_runs_the_cuda_suite_and_names_the_card(tmp_path):
    """``bench.device smoke`` runs tests/test_cuda.py (here every test skipped with its reason: no GPU) and writes its
    JUnit report and the card beside it."""
    import json

    assert device.main(["smoke", "--out", str(tmp_path)]) == 0
    import re

    report = (tmp_path / "smoke/junit.xml").read_text()
    tests, skipped = (int(re.search(rf'{key}="(\d+)"', report).group(1)) for key in ("tests", "skipped"))
    assert tests == skipped >= 10 and "no CUDA device" in report
    assert json.loads((tmp_path / "smoke/device.json").read_text()) == {"part": "smoke", "card": "none", "rc": 0}
