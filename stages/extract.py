"""DVC stage 'extract': Per-sample gradients, logits and features into a zarr store."""

from lowgrad.stages.extract import extract
from stages._run import run_stage

if __name__ == "__main__":
    run_stage(extract, "Per-sample gradients, logits and features into a zarr store.", per_dataset=True)
