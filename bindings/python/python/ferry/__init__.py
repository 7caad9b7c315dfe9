"""Ferry: planned, overlapped, budgeted weight paging.

``import ferry.torch`` and call ``ferry.torch.offload(model_or_pipeline, budget=...)``.
The Rust core lives in ``ferry._ferry``; this package only depends on PyTorch when
``ferry.torch`` is imported.
"""

from .errors import (  # noqa: F401
    AlreadyOffloadedError,
    BudgetTooSmallError,
    DeviceError,
    FerryError,
    InvalidArgumentError,
    ModuleChangedError,
    NotOffloadedError,
    UnsupportedDtypeError,
    UnsupportedError,
    UseAfterRemoveError,
)

__version__ = "0.1.0"


def __getattr__(name):
    # `import ferry; ferry.torch.offload(...)` works without importing torch eagerly.
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'ferry' has no attribute {name!r}")
