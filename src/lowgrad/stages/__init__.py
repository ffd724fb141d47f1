"""The pipeline's stage bodies, one module per DVC stage (``stages/<name>.py`` at the project root is each one's
command-line entry). Each body is a function of validated params that reads its inputs and writes its outputs
atomically (:mod:`lowgrad.paths`); a stage module imports only what that stage uses, so ``dvc.yaml`` can list
exactly the code each stage depends on. (The order to run them in: :mod:`lowgrad.plan`, which no stage imports.)
"""
