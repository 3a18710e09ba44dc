"""One switch for every op: ``torch | triton | auto``.

``auto`` picks Triton on CUDA tensors of a supported dtype and the PyTorch path
elsewhere. Each model module carries its own choice (``kernel_impl`` attribute, set with
:func:`unifusion.layers.set_kernel_impl`) and passes it as a call's ``impl=`` argument;
``None`` there falls back to the process-wide default of :func:`set_impl` / the
``UNIFUSION_KERNEL_IMPL`` environment variable (for scripts).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

IMPLS = ("torch", "triton", "auto")
_default_impl = os.environ.get("UNIFUSION_KERNEL_IMPL", "auto")


def _check(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"kernel impl must be one of {IMPLS}, got {impl!r}")
    return impl


def set_impl(impl: str) -> None:
    """Set the process-wide default implementation for all ops."""
    global _default_impl
    _default_impl = _check(impl)


def get_impl() -> str:
    return _default_impl


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
    """Temporarily switch the default implementation."""
    global _default_impl
    old, _default_impl = _default_impl, _check(impl)
    try:
        yield
    finally:
        _default_impl = old


# torch.compile: treat these environment checks as constants while tracing (no graph break)
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - platform without triton
        return False
    return True


@torch.compiler.assume_constant_result
def interpreter_active() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``).

    triton 3.9 reads the variable through ``triton.knobs.runtime.interpret`` on every
    access; our kernels are built at launch (see ``_triton_utils.lazy_jit``), so setting
    it any time before the first launch is enough.
    """
    from ._triton_utils import interpreter_active as _active

    return _active()


def resolve_impl(impl: str | None, *tensors: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for this call."""
    impl = _check(impl or _default_impl)
    if impl == "torch":
        return "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' was requested but triton is not installed; use impl='torch'")
        on_cuda = all(t.is_cuda for t in tensors)
        if not on_cuda and not interpreter_active():
            raise RuntimeError(
                "impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 in the environment (any time before the launch) "
                "to run the kernels on CPU under the interpreter; use impl='torch' or 'auto'"
            )
        return "triton"
    # auto
    if triton_available() and tensors and all(t.is_cuda for t in tensors):
        if all(t.dtype in (torch.float16, torch.bfloat16, torch.float32) for t in tensors):
            return "triton"
    return "torch"
