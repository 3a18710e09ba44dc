"""Shared helpers for the Triton kernels.

``lazy_jit`` replaces ``@triton.jit`` for our kernels. In triton 3.9 ``@triton.jit``
decides *at decoration time* (i.e. when the kernel module is imported) whether the
function becomes a compiled ``JITFunction`` or an ``InterpretedFunction``: it reads
``triton.knobs.runtime.interpret``, which looks up ``TRITON_INTERPRET`` in the
environment on every access. Importing ``unifusion.kernels`` before the variable is
set would therefore freeze the kernels in compiled mode for the whole process. Our
wrapper keeps the raw Python function and builds the right object at *launch* time,
so ``TRITON_INTERPRET=1`` only has to be set before the first launch (the tests set it
with a fixture; import order no longer matters).

Triton's *own* ``@jit`` helpers (``tl.max``, ``tl.sum``, ``tl.sigmoid``, ``tl.zeros``...,
defined in ``triton.language.standard``) are frozen the same way when ``triton`` is
imported -- and ``import lightning`` imports triton, so in a test session they are
usually compiled-mode ``JITFunction`` objects that refuse to run in the interpreter
("Cannot call @triton.jit'd outside of the scope of a kernel"). For an interpreted
launch we therefore swap every ``JITFunction`` attribute of the ``triton.language*``
modules for an ``InterpretedFunction`` of the same Python function, and restore them
right after the launch (:func:`_interpretable_triton_language`).

Kernels wrapped this way must not call our own ``@triton.jit`` helpers (they would be
frozen at their own decoration); keep each kernel self-contained.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:  # pragma: no cover - import guard for platforms without triton
    import triton
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover
    triton = None
    HAS_TRITON = False


def interpreter_active() -> bool:
    """True when Triton kernels will run under the CPU interpreter."""
    if HAS_TRITON:
        try:
            return bool(triton.knobs.runtime.interpret)
        except AttributeError:  # older triton without knobs
            pass
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETED_STDLIB: dict[int, Any] = {}

# Set by the first interpreted launch. Triton's interpreter patches triton.language builtins
# for good (e.g. ``tl.program_id`` then returns interpreter values), so a process that ran
# an interpreted kernel can no longer compile one for a GPU (compile_check spawns a fresh
# process then).
_INTERPRETED_LAUNCH = False


def interpreted_launch_happened() -> bool:
    """True once any of our kernels ran under the interpreter in this process."""
    return _INTERPRETED_LAUNCH


@contextlib.contextmanager
def _interpretable_triton_language() -> Iterator[None]:
    """Temporarily make triton.language's compiled-mode @jit helpers interpretable."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    patched = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                wrapped = _INTERPRETED_STDLIB.get(id(value))
                if wrapped is None:
                    wrapped = _INTERPRETED_STDLIB[id(value)] = (value, InterpretedFunction(value.fn))
                setattr(module, attr, wrapped[1])
                patched.append((module, attr, value))
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)


class LazyKernel:
    """``kernel[grid](*args)`` that picks compiled or interpreted mode at launch."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled = None
        self._interpreted = None

    def _get(self):
        if interpreter_active():
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        if self._compiled is None:
            from triton.runtime.jit import JITFunction

            self._compiled = JITFunction(self.fn)
        return self._compiled

    def __getitem__(self, grid):
        kernel = self._get()
        if not interpreter_active():
            return kernel[grid]
        global _INTERPRETED_LAUNCH
        _INTERPRETED_LAUNCH = True

        def launch(*args, **kwargs):
            with _interpretable_triton_language():
                return kernel[grid](*args, **kwargs)

        return launch


def lazy_jit(fn: Callable[..., Any]) -> LazyKernel:
    return LazyKernel(fn)


def next_pow2(x: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(x) - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 unless torch allows TF32 for matmuls."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def num_programs_for_reduction(device: torch.device, rows: int) -> int:
    """How many programs share a row reduction (for weight gradients without atomics)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))
