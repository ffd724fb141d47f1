"""DVC stage 'model': Import the configured checkpoint or train the classifier."""

from lowgrad.stages.model import model
from stages._run import run_stage

if __name__ == "__main__":
    run_stage(model, "Import the configured checkpoint or train the classifier.", per_dataset=False)
