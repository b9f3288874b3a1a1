"""Typed errors of the export stage. Each message is the whole story for the user: the CLI prints it
without a traceback (ctxmem.cli treats every exception defined under ``ctxmem`` as a user error)."""
from __future__ import annotations

from typing import Any


class ExportError(RuntimeError):
    """Base class: something in export / verification / registry / eval that the user can fix."""


class ModelSpecError(ExportError):
    """A --model SPEC that names nothing usable (missing directory, malformed URI, wrong content)."""


class RuntimeConfigError(ExportError):
    """An export directory whose runtime config is missing or invalid."""


class ExportModelError(ExportError):
    """A model.onnx (or its external data) that ONNX Runtime cannot load."""


class ProviderError(ExportError):
    """An execution provider that was asked for explicitly but is not the one running."""


class VerificationError(ExportError):
    """The export does not reproduce the PyTorch model. ``stage`` says where (e.g. "decode step 3 after
    slide 2"), ``tensor`` which output, ``max_diff`` by how much; ``report`` is the report so far."""

    check = "verification"

    def __init__(self, message: str, *, stage: str | None = None, tensor: str | None = None,
                 max_diff: float | None = None, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.stage, self.tensor, self.max_diff, self.report = stage, tensor, max_diff, report


class OutputNameError(VerificationError):
    """The graph's input/output names differ from the export contract."""

    check = "names"


class ShapeError(VerificationError):
    """An output of the graph has a different shape than the PyTorch model's."""

    check = "shapes"


class AtolError(VerificationError):
    """An output of the graph differs from the PyTorch model's beyond the tolerance."""

    check = "values"


class TokenMismatchError(VerificationError):
    """Greedy generation through ONNX Runtime diverged from PyTorch."""

    check = "greedy"


class AccuracyError(VerificationError):
    """A quantised variant (int8, fp16) lost more validation loss than its tolerance allows."""

    check = "accuracy"


class TamperedExportError(VerificationError):
    """The export's files changed after they were verified (their hashes differ from the report)."""

    check = "hashes"


class RegistryError(ExportError):
    """A model registry operation that cannot be done as asked."""


class AliasNotFoundError(RegistryError):
    """``models:/NAME@ALIAS`` with an alias that does not exist; the message lists those that do."""


class PromotionRefusedError(RegistryError):
    """The promotion gate refused to move an alias; the message gives every reason (verification,
    validation perplexity, the memory evaluation: missing, measured on another text, sink perplexity
    past the window too high) and the way around each."""


class EvalError(ExportError):
    """Evaluation data that cannot be read or is too short, or a memory evaluation result file
    (`registry evaluate-memory --result`) that cannot be read."""


class UnsafeFilePathError(RuntimeConfigError):
    """A file path in runtime_config.json (its ``files`` section) that leaves the export folder: an
    absolute path, a ``..`` component, or a symlink pointing outside. ``key`` names it (``files.model``)."""

    def __init__(self, message: str, *, key: str):
        super().__init__(message)
        self.key = key


class ArtifactIntegrityError(RegistryError):
    """A downloaded model whose files differ from the sha256 recorded for them (at registration, or
    in the export's verification report). ``file`` is the first such file, ``expected`` and ``actual``
    its recorded and downloaded sha256 (``actual`` None: the file is missing). The download is removed
    before this is raised: nothing of it is loaded or cached."""

    def __init__(self, message: str, *, file: str, expected: str, actual: str | None):
        super().__init__(message)
        self.file, self.expected, self.actual = file, expected, actual
