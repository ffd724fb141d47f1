"""Documented commands cannot rot: every ``python -m flows.pipeline`` command written in README.md, docs/ and the
configs' comments parses and passes ``--check`` (params valid, inputs present, a stage plan); ``--check`` itself
runs nothing and changes nothing."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHARED

FLOW = re.compile(r"python -m flows\.pipeline(?P<args>[^`\n&|;]*)")
# paths the docs and the ImageNet profile write for the reader's own files: --check may find them missing
PLACEHOLDERS = ("/data/", "/path/to/", "data/raw/", "data/imagenet/", "data/ood/")


def documented_commands(text: str, comment_prefix: str = "") -> list[list[str]]:
    """The argument lists of every ``python -m flows.pipeline`` command in ``text`` (``\\`` continuations joined,
    ``# comments`` dropped; ``comment_prefix``: the commands sit in comments, as in a YAML file)."""
    lines = [ln.lstrip().removeprefix(comment_prefix) if comment_prefix else ln for ln in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    commands = []
    for match in FLOW.finditer(joined):
        args = shlex.split(match.group("args"), comments=True)
        if not any(re.fullmatch(r"<[^>]+>", a) or a.startswith("[") for a in args):  # `<other>`, `[--set ...]`: a
            # placeholder or a usage synopsis in prose, not a command
            commands.append(args)
    return commands


def all_documented() -> list[tuple[str, list[str]]]:
    found = [("README.md", c) for c in documented_commands((ROOT / "README.md").read_text())]
    for doc in sorted((ROOT / "docs").glob("*.md")):
        found += [(f"docs/{doc.name}", c) for c in documented_commands(doc.read_text())]
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        found += [(f"configs/{config.name}", c) for c in documented_commands(config.read_text(), comment_prefix="#")]
    return found


def check_documented(args: list[str], root: Path = ROOT) -> list[str]:
    """``--check`` of one documented command, in this process; missing inputs at placeholder paths (or in an absent
    ../shared) are allowed, any other problem raises."""
    from flows.params_file import parse_overrides
    from flows.pipeline import build_parser, check_architecture, missing_inputs, validated_params
    from lowgrad.plan import stage_plan

    parsed = build_parser().parse_args(args)
    _, _, params = validated_params(parsed.params_file, parse_overrides(parsed.set) or None, root)
    check_architecture(params)
    for key, path in missing_inputs(params, root):
        absent_shared = not SHARED.exists() and (root / path).resolve().is_relative_to(SHARED.resolve())
        assert path.startswith(PLACEHOLDERS) or absent_shared, f"{key}: {path} not found"
    return stage_plan(params, root)


COMMANDS = all_documented()


def test_the_docs_hold_the_commands_users_run():
    where = {w for w, _ in COMMANDS}
    assert {"README.md", "docs/routes.md", "docs/team.md", "configs/imagenet_resnet50.yaml"} <= where
    gpu = next(c for w, c in COMMANDS if w == "docs/routes.md" and "configs/cifar10_resnet18_gpu.yaml" in c)
    assert gpu.count("--set") == 5  # the continuation lines were joined


@pytest.mark.parametrize("where, args", COMMANDS, ids=[f"{w}:{' '.join(a)[:60]}" for w, a in COMMANDS])
def test_every_documented_flow_command_passes_check(where, args):
    plan = check_documented(args)
    assert plan[0].startswith("prepare@") and plan[-2:] == ["score", "report"], (where, plan)


def _documented(pattern: str) -> list[list[str]]:
    """The argument lists of every documented command matching ``pattern`` (README.md and docs/)."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in re.finditer(pattern + r"(?P<args>[^`\n&|;]*)", doc.read_text()):
            args = shlex.split(match.group("args"), comments=True)
            if args:  # `lowgrad score` named in prose: not a command
                found.append(args)
    return found


def test_documented_lowgrad_and_monitor_commands_parse():
    """``lowgrad score ...`` and ``python -m flows.monitor ...`` as written in the docs parse with their own command
    lines (their runs are tested in tests/test_user_model.py and tests/test_monitor.py); a misspelt option fails."""
    from flows.monitor import build_parser as monitor_parser
    from lowgrad.cli import build_parser as cli_parser

    scores, monitors = _documented(r"\blowgrad score"), _documented(r"python -m flows\.monitor")
    assert len(scores) >= 2 and len(monitors) >= 2
    for args in scores:
        assert cli_parser().parse_args(["score", *args]).run
    for args in monitors:
        parsed = monitor_parser().parse_args(args)
        assert parsed.once or parsed.every
    with pytest.raises(SystemExit):
        cli_parser().parse_args(["score", "--run", ".", "--image", "x.npz", "--out", "s.csv"])


def test_a_rotten_command_is_caught():
    """Negative controls: a misspelt key and a wrong value in a documented command fail the check."""
    from lowgrad.errors import ConfigError

    from lowgrad.errors import CheckpointError

    for doc in ("python -m flows.pipeline --set subspace.kk=3", "python -m flows.pipeline --set gradient.sketch=fast",
                "python -m flows.pipeline --set model.arch=tv:resnet50"):
        [args] = documented_commands(f"```\n{doc}\n```")
        with pytest.raises(ConfigError):
            check_documented(args)
    [args] = documented_commands("```\npython -m flows.pipeline --set model.arch=torchvision:resnet5\n```")
    with pytest.raises(CheckpointError, match=r"'torchvision:resnet5': not a torchvision classification model "
                                              r"\(closest: resnet50"):
        check_documented(args)  # a name is checked too: the model is built as the stages will build it


def test_check_runs_nothing_and_changes_nothing(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    before = (ROOT / "params.yaml").read_text()
    run = lambda *a: subprocess.run([sys.executable, "-m", "flows.pipeline", "--check", *a], cwd=ROOT, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    ok = run("--set", "subspace.k=4")
    assert ok.returncode == 0, ok.stderr
    assert "params ok: params.yaml --set subspace.k=4 (route: exact)" in ok.stdout and "  report" in ok.stdout
    bad = run("--set", "subspace.kk=4")
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error: ")]
    assert bad.returncode == 1 and len(errors) == 1 and "subspace.kk: unknown key (did you mean 'k'?)" in errors[0]
    assert (ROOT / "params.yaml").read_text() == before  # untouched
    assert not (tmp_path / "prefect/temporary-server.log").exists()  # no server was started, quietly
    assert "temporary server" not in ok.stdout + ok.stderr + bad.stdout + bad.stderr  # or by Prefect
