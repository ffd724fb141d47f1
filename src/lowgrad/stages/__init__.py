"""The pipeline's stage bodies, one module per DVC stage (``stages/<name>.py`` at the project root is each one's
command-line entry). Each body is a function of validated params that reads its inputs and writes its outputs
atomically (:mod:`lowgrad.paths`); a stage module imports only what that stage uses, so ``dvc.yaml`` can list
exactly the code each stage depends on.
"""

from __future__ import annotations

from lowgrad.config import Params


def stage_names(params: Params) -> list[str]:
    """This configuration's DVC stage names in dependency order (``prepare@id_train``, ..., ``report``)."""
    names = list(params.data.datasets)
    return (
        [f"prepare@{n}" for n in names] + ["model", "factors"] + [f"extract@{n}" for n in names] + ["subspace"]
        + [f"project@{n}" for n in names] + ["score", "report"]
    )
