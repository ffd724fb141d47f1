"""The device run (issue 36): what a session lent a GPU runs first, one part per call of at most 10 minutes.

    python -m bench.device smoke --out $OUT             # first: the CUDA smoke suite (tests/test_cuda.py, < 5 min)
    python -m bench.device plan                         # each part's command and expected device time
    python -m bench.device run gpu_profile --out $OUT   # (a) the paper's sizes, matrix-free exact route, on CUDA
    python -m bench.device run authors --out $OUT       # (b) the authors' recipe trained (resumes), then (a) on it
    python -m bench.device check                        # every part's plan through the flow's --check (no stage runs)

Each part is one ``python -m flows.pipeline`` run in this checkout; ``run`` copies the params, metrics, report,
plots and stage timings written during the call to ``--out/<part>/`` with the card's name (``nvidia-smi``), whatever
the run's exit status (a SIGTERM from a time limit included), so a call cut off by its time limit still brings back
what finished (DVC keeps finished stages, and the
train stage's ``models/trained.resume.pt``, on a machine kept warm between calls). ``check`` is what CI runs on the
CPU: the same commands with ``--check`` and ``device: cpu``.

Part (a) needs ``../shared`` (about 97 MB): carry it in two pieces with ``python -m bench.subset_shared``
(docs/routes.md) and point the sets at the joined copy with ``--set`` (``run`` passes extra ``--set``s through).
Expected device times (H200 anchors of ``../shared/METHOD.md``: about 2,300 per-sample gradients/s with
``torch.func``, 28,000 images/s forward and backward) are in :data:`PARTS` and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lowgrad import paths

ROOT = Path(__file__).resolve().parents[1]

# The matrix-free exact route at the paper's N and k (docs/routes.md, "exact_randomized"); one power iteration
# keeps part (a) within one 10-minute call (the authors use 10: about 2,000 s more of per-sample gradients).
EXACT_ROUTE = ["gradient.sketch=none", "subspace.method=exact_randomized", "subspace.power_iters=1",
               "subspace.oversample=50", "gradient.batch_size=128", "device=cuda"]


@dataclass(frozen=True)
class Part:
    name: str
    params_file: str
    overrides: tuple[str, ...]
    expected: str  # expected device time and where it goes


PARTS = {
    "gpu_profile": Part(
        "gpu_profile", "configs/cifar10_resnet18_gpu.yaml", tuple(EXACT_ROUTE),
        "about 5 min on an H200: (2 q + 3) = 5 passes of per-sample gradients over the 50,000 kernel images and one "
        "over each of the 81,200 images to project (331,200 at about 2,300/s: 144 s), the P x 250 matmuls (about "
        "1.9 PFLOP: under a minute), writing and streaming V (8.9 GB per pass), forward ODIN (31,200 images) and "
        "the CPU-side scoring (about 2 min at N = 50,000)"),
    "authors": Part(
        "authors", "configs/cifar10_resnet18_authors.yaml", tuple(EXACT_ROUTE),
        "about 12 min of training on an H200 (200 epochs x 50,000 images x 2 forward-backward passes for SAM = "
        "20 M at about 28,000/s), then part (a)'s 5 min on the trained model: two calls, on a machine kept warm "
        "between them (the resume state, 89 MB for ResNet-18 with its momentum, is over the 64 MiB a call can carry)"),
}


def overrides(part: Part, extra: list[str], check: bool) -> list[str]:
    """The ``--set``s of ``part`` (``check``: on the CPU)."""
    sets = [*part.overrides, *extra]
    return [s for s in sets if not s.startswith("device=")] + ["device=cpu"] if check else sets


def command(part: Part, extra: list[str], check: bool) -> list[str]:
    """The flow's command line for ``part`` (``check``: validate and plan on the CPU, run nothing)."""
    return [sys.executable, "-m", "flows.pipeline", "--params-file", part.params_file,
            *[a for s in overrides(part, extra, check) for a in ("--set", s)], *(["--check"] if check else [])]


def card() -> str:
    """The accelerator's name as ``nvidia-smi`` reports it ("none" without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def collect(part: Part, out: Path, rc: int, started: float, wall_s: float) -> None:
    """Copy what this call produced to ``out/<part>``: files written since ``started`` (wall clock) only, so the
    committed report of another run, or a stage this call did not reach, is never passed off as this part's."""
    dest = out / part.name
    dest.mkdir(parents=True, exist_ok=True)
    files = [ROOT / rel for rel in (paths.PARAMS, paths.METRICS, paths.REPORT, paths.DVC_LOCK)]
    files += [f for rel in (paths.PLOTS, paths.TIMINGS) if (ROOT / rel).is_dir() for f in (ROOT / rel).iterdir()]
    copied = []
    for f in files:
        if f.is_file() and f.stat().st_mtime >= started:
            target = dest / f.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            copied.append(str(f.relative_to(ROOT)))
    (dest / "device.json").write_text(json.dumps({"part": part.name, "card": card(), "rc": rc, "wall_s": round(wall_s, 1),
                                                  "written_this_call": copied, "expected": part.expected}, indent=1) + "\n")


def smoke(out: Path) -> int:
    """The CUDA smoke suite, its JUnit report and the card's name in ``out/smoke``; its exit status."""
    dest = (out / "smoke").resolve()  # pytest runs in the repository root: one folder for both files
    dest.mkdir(parents=True, exist_ok=True)
    rc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-n", "0", "-q",
                         "tests/test_cuda.py", f"--junitxml={dest / 'junit.xml'}"], cwd=ROOT).returncode
    (dest / "device.json").write_text(json.dumps({"part": "smoke", "card": card(), "rc": rc}, indent=1) + "\n")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["smoke", "plan", "check", "run"])
    parser.add_argument("part", nargs="?", choices=list(PARTS))
    parser.add_argument("--out", type=Path, default=Path("bench/device-out"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to the flow")
    args = parser.parse_args(argv)
    if args.action == "smoke":
        return smoke(args.out)
    parts = [PARTS[args.part]] if args.part else list(PARTS.values())
    if args.action == "plan":
        for part in parts:
            print(f"{part.name}: {' '.join(command(part, args.set, False)[1:])}\n  expected: {part.expected}")
        return 0
    if args.action == "check":  # what `flows.pipeline ... --check` does, in this process
        from flows.params_file import parse_overrides
        from flows.pipeline import check
        from lowgrad.errors import LowgradError

        for part in parts:
            try:
                print("\n".join(check(part.params_file, parse_overrides(overrides(part, args.set, True)), ROOT)))
            except LowgradError as err:
                print(f"error: bench.device: part {part.name} does not pass --check: {err}", file=sys.stderr)
                return 1
        return 0
    if args.part is None:
        parser.error("run takes one part: each is one call of at most 10 minutes")
    import signal
    import time

    def stopped(signum, frame):  # a call's time limit (timeout sends SIGTERM): unwind, so the finally below runs
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stopped)
    started, clock = time.time(), time.perf_counter()
    rc = 130
    try:
        rc = subprocess.run(command(parts[0], args.set, False), cwd=ROOT).returncode
    except KeyboardInterrupt:
        rc = 124
    finally:
        collect(parts[0], args.out, rc, started, time.perf_counter() - clock)
    return rc


if __name__ == "__main__":
    sys.exit(main())
