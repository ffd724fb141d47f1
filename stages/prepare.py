"""DVC stage 'prepare': Load, check and save one dataset."""

from lowgrad.stages.prepare import prepare
from stages._run import run_stage

if __name__ == "__main__":
    run_stage(prepare, "Load, check and save one dataset.", per_dataset=True)
