"""Triton kernels (installed as ``pipesd.kernels``): fused sampling and chain/tree verification.

Modules: ``rowops`` (shared row passes, Philox, threshold search, inverse-CDF draw),
``sampling`` (fused sampler, filtered-probs kernel), ``verify`` (per-node verification and
the walk), ``aot_check`` (compile every kernel for a CUDA target without a GPU).
Use them through :mod:`pipesd.verify`, which validates inputs and picks the backend.
"""
