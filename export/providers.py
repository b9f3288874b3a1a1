"""The one choice of ONNX Runtime execution provider, shared by the runtime, `ctxmem eval` and serving.

Settings: None or "auto" = CUDA where this onnxruntime build offers it, else CPU; "cpu" / "cuda"
(or their ORT names, e.g. "CUDAExecutionProvider") are checked against the build. The answer is a
short name, "cpu" or "cuda"; `ort_name` gives what ONNX Runtime calls it.
"""
from __future__ import annotations

from .errors import ProviderError

ORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
AUTO = "auto"


def is_auto(setting: str | None) -> bool:
    """True when the caller left the choice to us (an explicit request that does not take is an error)."""
    return setting is None or setting.lower() == AUTO


def ort_name(short: str) -> str:
    """'cpu' -> 'CPUExecutionProvider', 'cuda' -> 'CUDAExecutionProvider'."""
    return ORT_NAMES[short]


def _available() -> list[str] | None:
    """This onnxruntime build's providers; None when onnxruntime is not installed (torch-only use)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return ort.get_available_providers()


def choose_provider(setting: str | None = None) -> str:
    """'cpu' or 'cuda' for a provider setting (see the module docstring). Raises ProviderError for an
    unknown name, or for 'cuda' when this onnxruntime build has no CUDA provider."""
    key = AUTO if setting is None else setting.strip().lower()
    key = {name.lower(): short for short, name in ORT_NAMES.items()}.get(key, key)
    if key != AUTO and key not in ORT_NAMES:
        raise ProviderError(f"provider {setting!r} is not one of auto, cpu, cuda")
    available = _available()
    if key == AUTO:
        return "cuda" if available and ORT_NAMES["cuda"] in available else "cpu"
    if available is not None and ORT_NAMES[key] not in available:
        raise ProviderError(f"execution provider {setting!r} is not in this onnxruntime build (install "
                            "onnxruntime-gpu instead of onnxruntime: pip install -e .[export,gpu]); "
                            f"available: {available}")
    return key


__all__ = ["choose_provider", "ort_name", "is_auto", "ORT_NAMES"]
