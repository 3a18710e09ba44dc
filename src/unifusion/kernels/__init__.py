"""Kernels for layerwise attention pooling, installed as ``unifusion.kernels``.

Each op lives in its own module with its plain PyTorch reference (the test oracle), a
PyTorch path tuned for speed and the Triton kernel (forward and backward, registered as
``torch.library`` custom ops with autograd, so ``torch.compile`` keeps them in the graph).
A call's ``impl=`` (``torch | triton | auto``; model modules pass their own ``kernel_impl``,
see :func:`unifusion.layers.set_kernel_impl`) selects the path; None falls back to the
process default (:func:`set_impl`, for scripts):

* :func:`layerwise_attention` ``(T, H, n, d)`` softmax attention over the layer axis;
* :func:`rms_norm`, :func:`swiglu`;
* :func:`layer_pool` ``(T, n, H), (n,) -> (T, H)``, LAP's ``n -> 1`` pooling without the
  permuted copy.

``python -m unifusion.kernels.compile_check`` compiles every kernel for sm_90/sm_80
without a GPU (registers, spills). Tests run the kernels on CPU under
``TRITON_INTERPRET=1``, which may be set any time before the first launch
(see ``_triton_utils.lazy_jit``).
"""

from .dispatch import IMPLS, get_impl, resolve_impl, set_impl, use_impl
from .layer_pool import layer_pool, layer_pool_reference
from .layerwise_attention import layerwise_attention, layerwise_attention_reference
from .rms_norm import rms_norm, rms_norm_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "IMPLS",
    "get_impl",
    "layer_pool",
    "layer_pool_reference",
    "layerwise_attention",
    "layerwise_attention_reference",
    "resolve_impl",
    "rms_norm",
    "rms_norm_reference",
    "set_impl",
    "swiglu",
    "swiglu_reference",
    "use_impl",
]
