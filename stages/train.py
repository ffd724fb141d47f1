"""DVC stage 'train': Train the classifier on id_train (when model.checkpoint is models/trained.pt)."""

from lowgrad.stages.train import train
from stages._run import run_stage

if __name__ == "__main__":
    run_stage(train, "Train the classifier on id_train (when model.checkpoint is models/trained.pt).", per_dataset=False)
