"""DVC stage 'subspace': Fit the kernel normaliser and the low-dimensional basis."""

from lowgrad.stages.subspace import subspace
from stages._run import run_stage

if __name__ == "__main__":
    run_stage(subspace, "Fit the kernel normaliser and the low-dimensional basis.", per_dataset=False)
