"""DVC stage 'project': Project one set's gradients onto the basis."""

from lowgrad.stages.project import project
from stages._run import run_stage

if __name__ == "__main__":
    run_stage(project, "Project one set's gradients onto the basis.", per_dataset=True)
