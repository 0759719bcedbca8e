"""Small argument checks shared by losses and the distiller; messages name what was wrong."""

from __future__ import annotations

from torch import Tensor


def check_same_shape(a: Tensor, b: Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} and {b_name} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_ndim(x: Tensor, ndim: int | tuple[int, ...], name: str) -> None:
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in allowed:
        want = " or ".join(str(d) for d in allowed)
        raise ValueError(f"{name} must be {want}-dimensional, got shape {tuple(x.shape)}")


def check_positive(value: float, name: str) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_non_negative(value: float, name: str) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
