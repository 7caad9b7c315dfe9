"""Ferry's exception hierarchy: every error Ferry raises is a :class:`FerryError`.

Each message names what was expected and what was found.
"""

from ._ferry import (  # noqa: F401  (re-exported)
    BudgetTooSmallError,
    DeviceError,
    FerryError,
    InvalidArgumentError,
    UnsupportedDtypeError,
    UseAfterRemoveError,
)


class ModuleChangedError(FerryError):
    """A module's parameters or buffers changed after Ferry planned it (a parameter replaced or
    re-assigned, ``module.to(...)``, an in-place write to an offloaded weight, new submodules
    from LoRA loading, ...). Call ``ferry.torch.remove`` before changing the model, then offload
    again."""


class UnsupportedError(FerryError):
    """A feature this build does not provide (e.g. the CUDA path of ``ferry.torch``, autograd
    through offloaded weights)."""


class NotOffloadedError(FerryError):
    """The object is not offloaded by Ferry (``remove``, ``metrics``, ... on a plain module)."""


class AlreadyOffloadedError(FerryError):
    """The object is already offloaded (by Ferry, or by accelerate / diffusers hooks)."""


__all__ = [
    "FerryError",
    "BudgetTooSmallError",
    "DeviceError",
    "InvalidArgumentError",
    "UnsupportedDtypeError",
    "UseAfterRemoveError",
    "ModuleChangedError",
    "UnsupportedError",
    "NotOffloadedError",
    "AlreadyOffloadedError",
]
