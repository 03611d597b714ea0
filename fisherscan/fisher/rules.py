"""Per-image parameter gradients of single layers from what one batched backward pass already has (Eq. 9).

For a layer y = f(x; theta) applied to every image of a batch independently, the gradient of image i's loss
with respect to theta needs only the layer's input x_i and the gradient g_i = d loss_i / d y_i that reaches
its output. Each rule below takes a chunk of ``images`` images -- x and g with a batch-major leading dimension
``images * k`` (k > 1 where a model folds windows or tokens into the batch, as SAM's window attention does) --
and returns {parameter name: per-image gradients (images, *parameter shape)} for the layer's own parameters, in
tensors the caller may overwrite (the engine squares them in place).
Rules do no autograd; the engine (``fisherscan.fisher.engine``) squares and sums what they return.

One small function per layer type, dispatched by exact module type (``rule_for``), in the style of BackPACK's
first-order extensions; the attention modules of a family get the rule its record names
(``fisherscan.models.families.Family.attention_rule``):

- Linear on token tensors: dW_i = sum_t g_it^T x_it (one batched matmul), db_i = sum_t g_it.
- LayerNorm (and timm's channels-first LayerNorm2d): dw_i = sum_t g_it * xhat_it, db_i = sum_t g_it.
- Conv2d (groups 1, numeric padding): unfolded to a Linear over patches; the patch embedding (stride = kernel)
  is the common case.
- LayerScale: dgamma_i = sum_t g_it * x_it.
- EVA's fused attention: its q/v biases from the gradient at its qkv Linear's output (a ``Dispatch`` on the child).
- SAM's attention with decomposed relative positions: rel_pos_h/w from the attention-logit gradient, which the
  rule recomputes from the module's input and output gradient (``sam_rel_pos``; qkv and proj keep the Linear rule).

Prefix (cls, register) and position tokens enter through a small function of the patch tokens
(``token_gradients``). Rotary embeddings (EVA) have no parameters. A parameter no rule covers is not skipped:
the engine computes it on an exact slower path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import LayerNorm2d, LayerScale
from timm.models.vision_transformer import LayerScale as VitLayerScale
from timm.models.vision_transformer_sam import get_rel_pos
from torch import nn

from ..models.families import attention_rule_name

Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]]


def _tokens(t: torch.Tensor, images: int, channels: int) -> torch.Tensor:
    """(images * k, ..., channels) -> (images, tokens, channels); the batch-major leading dimension is kept."""
    return t.reshape(images, -1, channels)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b per image; on CUDA, bf16/fp16 operands give an fp32 product directly (no rounding to bf16 first)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # pragma: no cover - older torch or unsupported: plain bmm
            pass
    return torch.bmm(a, b)


def linear(module: nn.Linear, x: torch.Tensor, g: torch.Tensor, images: int) -> dict[str, torch.Tensor]:
    """y = x W^T + b on (..., in) tokens: dW_i = sum_t g_it^T x_it (batched matmul), db_i = sum_t g_it."""
    g3 = _tokens(g, images, module.out_features)
    out = {"weight": _bmm(g3.transpose(1, 2), _tokens(x, images, module.in_features).to(g3.dtype))}
    out.update(linear_bias(module, g, images))
    return out


def linear_bias(module: nn.Linear, g: torch.Tensor, images: int) -> dict[str, torch.Tensor]:
    """The Linear rule's bias alone, db_i = sum_t g_it (none without a bias)."""
    if module.bias is None:
        return {}
    return {"bias": _tokens(g, images, module.out_features).float().sum(dim=1)}


def _normalized(x: torch.Tensor, dims: int, eps: float) -> torch.Tensor:
    """xhat = (x - mean) / sqrt(var + eps) over the last ``dims`` dimensions (biased variance), in fp32."""
    x = x.float()
    axes = tuple(range(-dims, 0))
    var, mean = torch.var_mean(x, dim=axes, keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(var + eps)


def layer_norm(module: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor, images: int) -> dict[str, torch.Tensor]:
    """y = xhat * w + b over the last dimensions: dw_i = sum_t g_it * xhat_it, db_i = sum_t g_it."""
    shape = tuple(module.normalized_shape)
    size = math.prod(shape)
    g3 = _tokens(g.float(), images, size)
    out = {}
    if module.weight is not None:
        xhat = _tokens(_normalized(x, len(shape), module.eps), images, size)
        out["weight"] = (g3 * xhat).sum(dim=1).reshape(images, *shape)
    if module.bias is not None:
        out["bias"] = g3.sum(dim=1).reshape(images, *shape)
    return out


def layer_norm_2d(module: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor, images: int) -> dict[str, torch.Tensor]:
    """timm's LayerNorm2d: LayerNorm over the channels of NCHW maps; the LayerNorm rule channels-last."""
    return layer_norm(module, x.permute(0, 2, 3, 1), g.permute(0, 2, 3, 1), images)


def conv2d(module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, images: int) -> dict[str, torch.Tensor]:
    """Conv2d as a Linear over unfolded patches: dW_i = sum_l g_il^T patch_il, db_i = sum_l g_il.

    For the patch embedding (stride = kernel, no padding) the patches do not overlap and unfolding is a reshape.
    """
    cols = F.unfold(x.to(g.dtype), module.kernel_size, dilation=module.dilation, padding=module.padding,
                    stride=module.stride)  # (images * k, in * kh * kw, L)
    g3 = g.flatten(2)  # (images * k, out, L)
    cols = cols.transpose(1, 2).reshape(images, -1, cols.shape[1])
    g3 = g3.transpose(1, 2).reshape(images, -1, g3.shape[1])
    out = {"weight": _bmm(g3.transpose(1, 2), cols).reshape(images, *module.weight.shape)}
    if module.bias is not None:
        out["bias"] = g3.float().sum(dim=1)
    return out


def layer_scale(module: nn.Module, x: torch.Tensor, g: torch.Tensor, images: int) -> dict[str, torch.Tensor]:
    """timm's LayerScale, y = x * gamma over the last dimension: dgamma_i = sum_t g_it * x_it."""
    channels = module.gamma.shape[-1]
    return {"gamma": (_tokens(g.float(), images, channels) * _tokens(x.float(), images, channels)).sum(dim=1)}


def eva_qkv_bias(module: nn.Module, x: torch.Tensor, g: torch.Tensor, images: int) -> dict[str, torch.Tensor]:
    """timm's EvaAttention with a fused qkv and separate q/v biases (k has none): qkv = x W^T + (q_bias, 0,
    v_bias). With x and g those of its ``qkv`` Linear, the biases' per-image gradients are the token sums of the
    q and v thirds of g (W is the Linear rule's)."""
    channels = module.q_bias.shape[0]
    summed = _tokens(g.float(), images, 3 * channels).sum(dim=1)
    return {"q_bias": summed[:, :channels], "v_bias": summed[:, 2 * channels:]}


def _rel_pos_matrix(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """timm's get_rel_pos as a matrix: R[a, b] = sum_l M[a, b, l] rel_pos[l] (gather, after a linear resize when
    the table has another length; the same map for every channel), so M = get_rel_pos(identity)."""
    eye = torch.eye(rel_pos.shape[0], dtype=torch.float32, device=rel_pos.device)
    return get_rel_pos(q_size, k_size, eye)  # (q_size, k_size, L)


def sam_rel_pos(module: nn.Module, x: torch.Tensor, g: torch.Tensor, images: int) -> dict[str, torch.Tensor]:
    """timm's SAM Attention with use_rel_pos (windowed or global): per-image gradients of rel_pos_h and rel_pos_w.

    x: the module's input (images * k, H, W, C), k windows per image (1 in global blocks); g: the gradient at its
    output. Per row b (a window and head), with q, k, v from the qkv Linear (q after q_norm, unscaled):
    S = scale q k^T + Bias, P = softmax(S), O = P v, out = proj(O, heads merged). Backward without autograd:
    dO = g W_proj (split into heads), dS = P * (dO v^T - rowsum(dO * O)) (softmax backward, since
    rowsum(P * dO v^T) = rowsum(dO * O)), and dBias = dS. The decomposed bias is
    Bias[b, (h, w), (h', w')] = sum_c q[b, h, w, c] (Rh[h, h', c] + Rw[w, w', c]), so
    dRh[h, h', c] = sum_{b, w} q[b, h, w, c] sum_{w'} dS[b, h, w, h', w'] and
    dRw[w, w', c] = sum_{b, h} q[b, h, w, c] sum_{h'} dS[b, h, w, h', w'], summing the rows b of image i (its
    windows and heads) for image i's gradient. With Rh = M_h rel_pos_h (``_rel_pos_matrix``: the index gather and any
    resize), d rel_pos_h[l, c] = sum_{h, h'} M_h[h, h', l] dRh[h, h', c]; the same for w. One image at a time
    (attention maps of a global block are large), each batched over its windows and heads, in fp32.
    """
    rows, H, W, C = x.shape
    k, heads = rows // images, module.num_heads
    d, N = C // heads, H * W
    Mh = _rel_pos_matrix(H, H, module.rel_pos_h)
    Mw = _rel_pos_matrix(W, W, module.rel_pos_w)
    w_qkv = module.qkv.weight.float()
    b_qkv = None if module.qkv.bias is None else module.qkv.bias.float()
    w_proj = module.proj.weight.float()
    out = {"rel_pos_h": torch.empty(images, *module.rel_pos_h.shape, dtype=torch.float32, device=x.device),
           "rel_pos_w": torch.empty(images, *module.rel_pos_w.shape, dtype=torch.float32, device=x.device)}
    with torch.no_grad():
        for i in range(images):
            xi = x[i * k:(i + 1) * k].float().reshape(k, N, C)
            qkv = F.linear(xi, w_qkv, b_qkv).view(k, N, 3, heads, d).permute(2, 0, 3, 1, 4)
            q, kk, v = qkv.reshape(3, k * heads, N, d).unbind(0)
            q, kk = module.q_norm(q).float(), module.k_norm(kk).float()
            rq = q.reshape(-1, H, W, d)
            rel_h = torch.einsum("bhwc,hkc->bhwk", rq, torch.einsum("hkl,lc->hkc", Mh, module.rel_pos_h.float()))
            rel_w = torch.einsum("bhwc,wkc->bhwk", rq, torch.einsum("wkl,lc->wkc", Mw, module.rel_pos_w.float()))
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(-1, N, N)
            p = torch.softmax(torch.baddbmm(bias, q, kk.transpose(1, 2), alpha=module.scale), dim=-1)
            o = torch.bmm(p, v)
            d_o = (g[i * k:(i + 1) * k].float().reshape(k, N, C) @ w_proj).view(k, N, heads, d)
            d_o = d_o.transpose(1, 2).reshape(k * heads, N, d)
            ds = p * (torch.bmm(d_o, v.transpose(1, 2)) - (d_o * o).sum(-1, keepdim=True))
            ds = ds.view(-1, H, W, H, W)
            d_rh = torch.einsum("bhwc,bhwk->hkc", rq, ds.sum(dim=4))
            d_rw = torch.einsum("bhwc,bhwk->wkc", rq, ds.sum(dim=3))
            out["rel_pos_h"][i] = torch.einsum("hkl,hkc->lc", Mh, d_rh)
            out["rel_pos_w"][i] = torch.einsum("wkl,wkc->lc", Mw, d_rw)
    return out


def token_gradients(embed: Callable[[torch.Tensor], torch.Tensor], params: dict[str, torch.Tensor],
                    x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image gradients of ``params`` (cls, register and position tokens) that enter through ``embed``, a cheap
    function applied to each image's patch tokens x_i (such as timm's ``_pos_embed``): the vector-Jacobian
    product of embed at x_i with the output gradient g_i, image by image. Needs autograd; ``params`` are the
    live parameters (their requires_grad is switched on for the call)."""
    names = list(params)
    flags = [params[n].requires_grad for n in names]
    out = {n: torch.zeros(x.shape[0], *params[n].shape, dtype=torch.float32, device=x.device) for n in names}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for i in range(x.shape[0]):
                y = embed(x[i:i + 1].detach())
                grads = torch.autograd.grad(y, [params[n] for n in names], g[i:i + 1].to(y.dtype), allow_unused=True)
                for n, value in zip(names, grads):
                    if value is None:
                        out.pop(n, None)
                    elif n in out:
                        out[n][i] = value.float()
    finally:
        for p, flag in zip(params.values(), flags):
            p.requires_grad_(flag)
    return out


def _conv_supported(module: nn.Conv2d) -> bool:
    return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _sam_rel_pos_supported(module: nn.Module) -> bool:
    """The forward sam_rel_pos assumes: rel-pos bias, no rope, Linear qkv/proj, no attention dropout at work."""
    return (getattr(module, "use_rel_pos", False) and getattr(module, "rope", None) is None
            and isinstance(module.qkv, nn.Linear) and isinstance(module.proj, nn.Linear)
            and (not module.training or module.attn_drop.p == module.proj_drop.p == 0))


def _eva_fused_qkv(module: nn.Module) -> bool:
    """The forward eva_qkv_bias assumes: a fused qkv Linear, separate q/v biases, and the switch that adds them
    after the Linear (so the Linear's hooks see the product)."""
    return (isinstance(getattr(module, "qkv", None), nn.Linear) and getattr(module, "q_bias", None) is not None
            and hasattr(module, "qkv_bias_separate"))


@dataclass(frozen=True)
class Dispatch:
    """How the engine applies ``rule`` to a module: on the input and output gradient of the child ``hooked``
    (default: the module itself), with the module attributes ``switches`` set while the engine runs."""

    rule: Rule
    hooked: str | None = None
    switches: dict = field(default_factory=dict)


RULES: dict[type, Rule] = {nn.Linear: linear, nn.LayerNorm: layer_norm, nn.Conv2d: conv2d, TimmLayerNorm: layer_norm,
                           LayerNorm2d: layer_norm_2d, LayerScale: layer_scale, VitLayerScale: layer_scale}

# the rules a family's attention module needs (``Family.attention_rule`` names them), and when they apply
FAMILY_RULES: dict[str, tuple[Dispatch, Callable[[nn.Module], bool]]] = {
    "sam_rel_pos": (Dispatch(sam_rel_pos), _sam_rel_pos_supported),
    "eva_qkv_bias": (Dispatch(eva_qkv_bias, "qkv", {"qkv_bias_separate": True}), _eva_fused_qkv),
}


def _generic_supported(rule: Rule, module: nn.Module) -> bool:
    if rule is conv2d:
        return _conv_supported(module)
    if rule is layer_scale:
        return not getattr(module, "inplace", False)  # x.mul_(gamma) overwrites the input the rule needs
    if rule in (layer_norm, layer_norm_2d):
        return not getattr(module, "_fast_norm", False)  # apex/fused norms may compute in another precision
    return True


def rule_for(module: nn.Module) -> Dispatch | None:
    """How to get this module's per-image gradients: its family's attention rule, else the rule of its exact
    type; None where no rule applies (the engine then takes an exact slower path)."""
    name = attention_rule_name(module)
    if name is not None:
        dispatch, supported = FAMILY_RULES[name]
        return dispatch if supported(module) else None
    rule = RULES.get(type(module))
    return Dispatch(rule) if rule is not None and _generic_supported(rule, module) else None
