"""Errors shared by the engines (a module of its own so ``vllm.py`` need not import the package)."""


class BackendUnavailable(RuntimeError):
    """The config asks for an engine this environment cannot run."""
