"""DVC stage 'score': Fit detectors on the ID bank and compute OOD metrics."""

from lowgrad.stages.score import score
from stages._run import run_stage

if __name__ == "__main__":
    run_stage(score, "Fit detectors on the ID bank and compute OOD metrics.", per_dataset=False, record_timing=False, scoring=True)
