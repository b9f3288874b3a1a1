"""Errors of the training stage. Each message is the whole story for the user: what is wrong and
what to do. `ctxmem.cli` prints them as one line (they live in a `ctxmem.*` module)."""
from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why and what to change."""


class DataError(TrainingError):
    """A corpus or a prepared data directory that cannot be used."""


class TrainConfigError(TrainingError):
    """A training config (YAML or override) that cannot describe a run."""


class ResumeError(TrainingError):
    """A checkpoint given to --resume that is missing, incomplete, corrupt or from another run."""
