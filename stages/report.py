"""DVC stage 'report': Write the Markdown report and PNG plots."""

from lowgrad.stages.report import report
from stages._run import run_stage

if __name__ == "__main__":
    run_stage(report, "Write the Markdown report and PNG plots.", per_dataset=False, record_timing=False, scoring=True)
