"""A fused Triton kernel for the Linear rule's weight (Eq. 9): sum_i (dW_i)^2 without materialising any dW_i.

The PyTorch rule (``rules.linear``) writes every image's weight gradient dW_i = sum_t g_it^T x_it to memory
(images x out x in in fp32), then squares it and sums over the images: for a ViT-L batch of 8 that is about 10 GB
written and read again per batch, memory traffic a training step does not have. This kernel computes each output
tile's dW_i in registers, image by image, squares it and accumulates the squares there, and adds the tile to the
fp32 accumulator once -- the multiply-adds of one weight gradient, and no per-image tensor at all.

Experimental, off by default: ``HookEngine(..., fused=True)`` (``make_engine(..., fused=True)``) uses it for
Linear weights on CUDA when Triton is importable; the PyTorch rule stays the default, the fallback and the oracle
(``tests/fisher/test_fused.py`` compares the two under ``TRITON_INTERPRET=1`` on the CPU; ``benchmarks/gpu_suite.py``
on the GPU). fp32 inputs are multiplied in IEEE fp32 (no TF32), bf16/fp16 ones accumulate in fp32.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can run on ``x``'s device: Triton on CUDA, or Triton's interpreter (CPU tensors)."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernel():
    """The Triton kernel, built on first use (Triton is imported only when the fused path runs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def squared_products(g_ptr, x_ptr, out_ptr, images, tokens, rows, cols,
                         stride_gb, stride_gt, stride_go, stride_xb, stride_xt, stride_xi, stride_oo, stride_oi,
                         BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
        """out[o, i] += sum_b (sum_t g[b, t, o] x[b, t, i])^2 for one (BLOCK_O, BLOCK_I) tile of out."""
        offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        squares = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for b in range(0, images):
            product = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
            for t0 in range(0, tokens, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                g = tl.load(g_ptr + b * stride_gb + offs_t[:, None] * stride_gt + offs_o[None, :] * stride_go,
                            mask=(offs_t[:, None] < tokens) & (offs_o[None, :] < rows), other=0.0)
                x = tl.load(x_ptr + b * stride_xb + offs_t[:, None] * stride_xt + offs_i[None, :] * stride_xi,
                            mask=(offs_t[:, None] < tokens) & (offs_i[None, :] < cols), other=0.0)
                if IEEE:
                    product += tl.dot(tl.trans(g), x, input_precision="ieee")
                else:
                    product += tl.dot(tl.trans(g), x)
            squares += product * product
        mask = (offs_o[:, None] < rows) & (offs_i[None, :] < cols)
        ptrs = out_ptr + offs_o[:, None] * stride_oo + offs_i[None, :] * stride_oi
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + squares, mask=mask)

    return squared_products, triton.cdiv


def add_squared_weight_gradients(out: torch.Tensor, g: torch.Tensor, x: torch.Tensor, images: int,
                                 blocks: tuple[int, int, int] | None = None) -> None:
    """out (rows, cols) fp32 += sum_i (g_i^T x_i)^2 over the ``images`` images of g (images * k, ..., rows) and
    x (images * k, ..., cols): the Linear rule's weight squares, summed, in one kernel. ``blocks`` (rows, cols,
    tokens per step) overrides the tile sizes."""
    g3 = g.reshape(images, -1, g.shape[-1])
    x3 = x.reshape(images, -1, x.shape[-1]).to(g3.dtype)
    rows, cols = g3.shape[-1], x3.shape[-1]
    if out.shape != (rows, cols) or out.dtype != torch.float32:
        raise ValueError(f"accumulator of shape {tuple(out.shape)} ({out.dtype}) for a ({rows}, {cols}) weight")
    kernel, cdiv = _kernel()
    ieee = g3.dtype == torch.float32
    # untuned first guesses for Hopper (two fp32 tile accumulators per program: 64 registers a thread each)
    block_o, block_i, block_t, warps, stages = (64, 64, 32, 4, 2) if ieee else (128, 64, 32, 8, 3)
    if blocks is not None:
        block_o, block_i, block_t = blocks
    grid = (cdiv(rows, block_o), cdiv(cols, block_i))
    kernel[grid](g3, x3, out, images, g3.shape[1], rows, cols, *g3.stride(), *x3.stride(), *out.stride(),
                 BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t, IEEE=ieee, num_warps=warps, num_stages=stages)
