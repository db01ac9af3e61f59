"""Small NNX layers whose params carry logical axis names (`axes` metadata, see parallel/rules.py).

Params are float32; `dtype` is the compute dtype the inputs and kernels are cast to. Norms and
softmax statistics stay in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jova_jax.kernels import dense_rows_cpu, weight_grad_cpu
from jova_jax.parallel.rules import gathered, weights_sharded


def _fan_in_init(key, shape, fan_in, scale=1.0):
  return jax.random.normal(key, shape, jnp.float32) * (scale / math.sqrt(fan_in))


def contract(x, kernel: nnx.Param, n_in: int, dtype, rows_valid=None):
  """x's last n_in dims contracted with the kernel's first n_in, both cast to dtype.

  On a mesh the kernel is all-gathered over its FSDP axes for the product (rules.gathered),
  as FSDP means: left to the partitioner, the text streams' products on a data x fsdp x tensor
  mesh came out with their batch rows permuted across devices (wrong values). The gather sits
  inside a checkpoint so the backward keeps the sharded kernel and gathers it again, instead of
  saving every layer's gathered copy. In a one-device float32 CPU program the weight gradient
  is the C++ kernel's (kernels/weight_grad_cpu.py), and where `rows_valid` (bool, x's leading
  dims) marks the rows that are read, the products skip the others, which come out 0
  (kernels/dense_rows_cpu.py); elsewhere every row is computed.
  """
  axes = kernel.get_metadata()["axes"]
  dims = _contraction(x.ndim, n_in)

  def product(x, w):
    return jax.lax.dot_general(x, gathered(w, axes), dims)
  x, w = x.astype(dtype), kernel[...].astype(dtype)
  if not weights_sharded():
    if rows_valid is not None and dense_rows_cpu.applies(dtype, math.prod(w.shape[:n_in]),
                                                         math.prod(w.shape[n_in:])):
      return dense_rows_cpu.product(x, w, rows_valid, n_in)
    if weight_grad_cpu.applies(dtype, math.prod(w.shape[n_in:])):
      return _product_cpu_weight_gradient(x, w, n_in)
    return jax.lax.dot_general(x, w, dims)
  return jax.checkpoint(product)(x, w)


def _contraction(ndim: int, n_in: int):
  """dot_general's dimension numbers for x (ndim dims)'s last n_in with a kernel's first n_in."""
  return ((tuple(range(ndim - n_in, ndim)), tuple(range(n_in))), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _product_cpu_weight_gradient(x, w, n_in: int):
  return jax.lax.dot_general(x, w, _contraction(x.ndim, n_in))


def _product_forward(x, w, n_in):
  return _product_cpu_weight_gradient(x, w, n_in), (x, w)


def _product_backward(n_in, residuals, dy):
  x, w = residuals
  n_out = w.ndim - n_in
  # dx = dy . W^T over the outputs, as XLA's own backward; dW = x^T dy in the kernel (float32
  # throughout: weight_grad_cpu.applies).
  dx = jax.lax.dot_general(dy, w, ((tuple(range(dy.ndim - n_out, dy.ndim)),
                                    tuple(range(n_in, w.ndim))), ((), ())))
  return dx, weight_grad_cpu.weight_gradient(x, dy, n_in)


_product_cpu_weight_gradient.defvjp(_product_forward, _product_backward)


class Dense(nnx.Module):
  """y = x @ W + b over the last `len(in_shape)` input dims, producing `out_shape` dims."""

  def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int],
               axes: Sequence[str | None], *, rngs: nnx.Rngs, dtype=jnp.float32,
               use_bias: bool = True, zero_init: bool = False):
    self.in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    self.out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    assert len(axes) == len(self.in_shape) + len(self.out_shape), axes
    shape = self.in_shape + self.out_shape
    fan_in = math.prod(self.in_shape)
    value = (jnp.zeros(shape, jnp.float32) if zero_init
             else _fan_in_init(rngs.params(), shape, fan_in))
    self.kernel = nnx.Param(value, axes=tuple(axes))
    out_axes = tuple(axes[len(self.in_shape):])
    self.bias = nnx.Param(jnp.zeros(self.out_shape, jnp.float32), axes=out_axes) if use_bias else None
    self.dtype = dtype
    self.lora = None  # a LoRA adapter, attached after construction (model/lora.py)

  def __call__(self, x, rows_valid=None):
    """rows_valid: None, or bool over x's leading dims marking the rows that are read (contract)."""
    n_in = len(self.in_shape)
    y = contract(x, self.kernel, n_in, self.dtype, rows_valid)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      y = y + self.lora(x, n_in)
    return y

  def unbiased(self, x, rows_valid=None):
    """x @ W (+ the LoRA update): the output before its bias, for a consumer that adds the bias
    as it reads (attention_cpu.segment_attention)."""
    n_in = len(self.in_shape)
    y = contract(x, self.kernel, n_in, self.dtype, rows_valid)
    return y if self.lora is None else y + self.lora(x, n_in)


def rms_norm(x, scale, eps: float):
  """x / rms(x) over the last dim, times `scale` (broadcast against x), in float32."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * scale).astype(x.dtype)


class RMSNorm(nnx.Module):
  """The scale of an rms_norm. The blocks' QK norms are applied by attention.joint_attention
  (attention.QKNorm), so that the 'cpu' kernel can apply them as it packs q and k."""

  def __init__(self, dim: int, axis_name: str | None, *, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=(axis_name,))
    self.eps = eps


def layer_norm(x, eps: float):
  """LayerNorm without affine params: adaLN supplies shift and scale.

  The mean is a product with a (D, 2) averaging matrix rather than a reduction, so that x is a
  dot operand: XLA then writes the residual stream out once per norm. As a reduction every use
  of x was fused with the whole chain of residual adds before it, recomputing all earlier
  layers' sums in each consumer (docs/performance.md, third round: the demo step -10%). Two
  columns, because a one-column product is rewritten into a reduction; HIGHEST, because TPU's
  default matmul precision would round x to bfloat16. On accelerators the product costs about
  as much as the reduction (one (D, 2) matmul per norm, padded to the MXU's width on TPU).
  """
  xf = x.astype(jnp.float32)
  averaging = jnp.zeros((x.shape[-1], 2), jnp.float32).at[:, 0].set(1.0 / x.shape[-1])
  mean = jnp.dot(xf, averaging, precision=jax.lax.Precision.HIGHEST)[..., :1]
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
  """adaLN: x * (1 + scale) + shift, with (B, D) shift/scale broadcast over tokens."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]
