"""The data stage (``data.prepare``) and the reader API downstream stages use.

Names are imported on first use so that ``import components.data.prepare`` (which the engine
does to validate a pipeline file) stays as light as pydantic: no numpy, pyarrow or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_READER_API = {
    "DatasetInfo",
    "load_dataset_info",
    "read_split",
    "load_numpy",
    "image_column",
    "normalize",
    "normalize_raw",
    "denormalize",
    "verify",
}

__all__ = sorted(_READER_API)


def __getattr__(name: str) -> Any:
    if name in _READER_API:
        return getattr(importlib.import_module("components.data.dataset"), name)
    raise AttributeError(f"module 'components.data' has no attribute {name!r}")
