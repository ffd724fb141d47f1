"""DVC stage 'factors': NFK Kronecker factors for the sketched gradient route."""

from lowgrad.stages.factors import factors
from stages._run import run_stage

if __name__ == "__main__":
    run_stage(factors, "NFK Kronecker factors for the sketched gradient route.", per_dataset=False)
