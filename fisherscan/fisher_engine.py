"""Exact per-image squared gradients (Eq. 9) at about the cost of one training step: the hook engine.

One batched forward and one backward per batch. The parameters do not require grad -- the input does -- so
autograd computes only activation gradients and skips the weight-gradient matmuls. Forward hooks keep each
scored layer's input; a hook on the layer's output receives the gradient g = d(sum_i loss_i)/d output, whose
rows for image i are d loss_i / d output_i, because each image's loss depends on that image alone (eval mode;
Eq. 6's batch spread is held constant). The layer's rule (``fisherscan.per_image_rules``) turns (input, g) into
per-image parameter gradients, a chunk of ``chunk_size`` images at a time, and their squares are added to fp32
accumulators; the kept input is freed as soon as its rule has run.

Never silently skipped. A module type without a rule (a GroupNorm, or SAM's attention in a configuration its rule
does not take, say) is recomputed image by image on its saved input, with autograd to its own parameters only
("recompute"). What remains (a module called more than once per forward, a parameter shared between modules or used
outside its module, a recompute that cannot be done) is computed exactly on the slowest path: torch.func vmap(grad)
restricted to those parameters (``fisherscan.fisher.vmap_squared_gradient_sum``, "fallback"). Parameters with no
path to the loss are found once per model and get exact zeros ("unused"). ``HookEngine.visits`` records which way
each parameter went.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from . import per_image_rules as rules
from .perturb import TokenShift

FALLBACK = "fallback"
RECOMPUTE = "recompute"
UNUSED = "unused"
_UNUSED_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


@dataclass
class _Site:
    """One scored module: its rule and its parameters (local name -> full name)."""

    module: nn.Module
    rule: rules.Rule
    names: dict[str, str]
    calls: int = 0
    saved: torch.Tensor | None = None
    failed: bool = False
    hooked: nn.Module | None = None  # whose input and output gradient the rule reads (default: module)
    switches: dict = field(default_factory=dict)  # module attributes set while the engine runs
    call: tuple | None = None  # recompute sites: (other args, kwargs, autocast dtype or None) of the call


@dataclass
class _TokenSite:
    """Prefix and position tokens that enter through ``embed(x)``, x the tokens a hook sees."""

    owner: nn.Module
    embed: object
    names: dict[str, str]
    calls: int = 0
    pending: list = field(default_factory=list)


def _sam_types() -> tuple[type, ...]:
    try:
        from timm.models.vision_transformer_sam import VisionTransformerSAM
    except ImportError:  # pragma: no cover
        return ()
    return (VisionTransformerSAM,)


TOKEN_NAMES = ("cls_token", "reg_token", "pos_embed")


def _tokens_of(out):
    """The token tensor of an embedding step's output (EVA's _pos_embed also returns its rotary embedding)."""
    return out[0] if isinstance(out, tuple) else out

MATMUL_RULES = (rules.linear, rules.conv2d)


class HookEngine:
    """The hook engine for ``model`` and the scored parameters ``params`` (full name -> parameter)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], chunk_size: int = 8):
        self.model, self.params, self.chunk_size = model, dict(params), max(1, int(chunk_size))
        self.visits: dict[str, str] = {}
        self._paused = False
        name_of = {id(p): n for n, p in self.params.items()}
        owners: dict[str, int] = {}
        for _, module in model.named_modules():
            for local, p in module.named_parameters(recurse=False):
                if id(p) in name_of:
                    owners[name_of[id(p)]] = owners.get(name_of[id(p)], 0) + 1
        shared = {n for n, count in owners.items() if count > 1}
        self.sites: list[_Site] = []
        self.token_sites: list[_TokenSite] = []
        self.planned: dict[str, str] = {}  # full name -> rule name
        for _, module in model.named_modules():
            direct = {local: name_of[id(p)] for local, p in module.named_parameters(recurse=False)
                      if id(p) in name_of and name_of[id(p)] not in shared}
            if not direct:
                continue
            tokens = {k: v for k, v in direct.items() if k in TOKEN_NAMES}
            if tokens and self._add_token_site(module, tokens):
                direct = {k: v for k, v in direct.items() if k not in tokens}
            rule, hooked, switches = rules.rule_for(module), None, {}
            child = rules.child_rule_for(module)
            if child is not None:
                hooked, rule, switches = getattr(module, child[0]), child[1], child[2]
            if not direct:
                continue
            if rule is None:  # no rule: image by image, autograd through this module alone (not the model)
                if module is model:
                    continue  # that would be the whole per-image loop: left to the vmap fallback
                rule = RECOMPUTE
            self.sites.append(_Site(module, rule, direct, hooked=hooked, switches=switches))
            self.planned.update({full: getattr(rule, "__name__", RECOMPUTE) for full in direct.values()})

    def _add_token_site(self, module: nn.Module, tokens: dict[str, str]) -> bool:
        if callable(getattr(type(module), "_pos_embed", None)):  # timm VisionTransformer, Eva
            self.token_sites.append(_TokenSite(module, None, tokens))
        elif isinstance(module, _sam_types()) and set(tokens) == {"pos_embed"}:  # x = patch_embed(x) + pos
            from timm.layers import resample_abs_pos_embed_nhwc

            self.token_sites.append(_TokenSite(module, lambda x, m=module: x + resample_abs_pos_embed_nhwc(
                m.pos_embed, x.shape[1:3]), tokens))
        else:
            return False
        self.planned.update({full: "tokens" for full in tokens.values()})
        return True

    # --- hooks -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _attached(self, sums: dict[str, torch.Tensor], images: int):
        handles = []
        wrapped = []
        restore = []

        for site in self.sites:
            site.calls, site.saved, site.failed = 0, None, False

            def forward_hook(module, args, *rest, site=site):
                output, kwargs = rest[-1], (rest[0] if len(rest) == 2 else {})
                if self._paused or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) \
                        or not output.requires_grad:
                    return
                site.calls += 1
                if site.calls > 1 or not args or not isinstance(args[0], torch.Tensor):
                    site.failed = True
                    return
                if site.rule == RECOMPUTE:
                    device = args[0].device.type
                    others = [*args[1:], *kwargs.values()]
                    if any(isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == args[0].shape[0] for t in others):
                        site.failed = True  # another batched input: slicing it is not safe to guess
                        return
                    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
                    site.call = (args[1:], kwargs, autocast)
                x = args[0].detach()
                device = x.device.type
                if site.rule in MATMUL_RULES and x.is_floating_point() and torch.is_autocast_enabled(device):
                    x = x.to(torch.get_autocast_dtype(device))  # what the matmul read; half the memory of fp32
                site.saved = x
                output.register_hook(lambda g, site=site: self._apply(site, g, sums, images))

            handles.append((site.hooked or site.module).register_forward_hook(
                forward_hook, with_kwargs=site.rule == RECOMPUTE))
            for attr, value in site.switches.items():
                restore.append((site.module, attr, getattr(site.module, attr)))
                setattr(site.module, attr, value)

        for token in self.token_sites:
            token.calls, token.pending = 0, []

            def keep(x, out, token=token):
                tensor = _tokens_of(out)
                if not self._paused and torch.is_grad_enabled() and isinstance(tensor, torch.Tensor) \
                        and tensor.requires_grad:
                    token.calls += 1
                    saved = x.detach()
                    tensor.register_hook(lambda g, token=token, saved=saved: token.pending.append((saved, g)))

            if token.embed is None:  # wrap the instance's _pos_embed(x)
                original = token.owner._pos_embed
                token.embed = lambda x, original=original: _tokens_of(original(x))

                def pos_embed(x, original=original, token=token):
                    out = original(x)
                    keep(x, out, token)
                    return out

                token.owner._pos_embed = pos_embed
                wrapped.append(token)
            else:  # SAM: the patch embedding's output is what the position embedding is added to
                handles.append(token.owner.patch_embed.register_forward_hook(
                    lambda module, args, output, token=token: keep(output, output, token)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, attr, value in restore:
                setattr(module, attr, value)
            for token in wrapped:
                del token.owner._pos_embed
                token.embed = None

    def _apply(self, site: _Site, g: torch.Tensor, sums: dict[str, torch.Tensor], images: int) -> None:
        x, site.saved = site.saved, None
        if site.failed or x is None or x.shape[0] != g.shape[0] or x.shape[0] % images:
            site.failed = True
            return
        k = x.shape[0] // images
        if site.rule == RECOMPUTE:
            self._recompute(site, x, g, sums, images, k)
            return
        for start in range(0, images, self.chunk_size):
            n = min(self.chunk_size, images - start)
            grads = site.rule(site.module, x[start * k:(start + n) * k], g[start * k:(start + n) * k], n)
            for local, value in grads.items():  # rules return tensors of their own: squared in place
                sums[site.names[local]] += value.float().square_().sum(dim=0)
                self.visits[site.names[local]] = site.rule.__name__

    def _recompute(self, site: _Site, x: torch.Tensor, g: torch.Tensor, sums: dict[str, torch.Tensor],
                   images: int, k: int) -> None:
        """The exact path for a module without a rule: per image, its forward again on that image's rows of the
        saved input (other layers' hooks paused) and autograd to its own parameters only, with the output
        gradient as the cotangent. Any failure leaves the parameters to the vmap fallback."""
        args, kwargs, autocast = site.call
        site.call = None
        params = {local: getattr(site.module, local) for local in site.names}
        device = x.device.type
        grads = {local: [] for local in params}
        try:
            self._paused = True
            for p in params.values():
                p.requires_grad_(True)
            with torch.enable_grad(), torch.autocast(device, dtype=autocast or torch.bfloat16,
                                                     enabled=autocast is not None):
                for i in range(images):
                    out = site.module.forward(x[i * k:(i + 1) * k], *args, **kwargs)
                    values = torch.autograd.grad(out, list(params.values()), g[i * k:(i + 1) * k].to(out.dtype),
                                                 allow_unused=True)
                    for local, value in zip(params, values):
                        grads[local].append(torch.zeros_like(params[local]) if value is None else value)
        except RuntimeError:
            site.failed = True
            return
        finally:
            self._paused = False
            for p in params.values():
                p.requires_grad_(False)
        for local, values in grads.items():
            sums[site.names[local]] += torch.stack(values).float().square_().sum(dim=0)
            self.visits[site.names[local]] = RECOMPUTE

    def _finish_tokens(self, sums: dict[str, torch.Tensor]) -> None:
        for token in self.token_sites:
            if token.calls != 1 or len(token.pending) != 1:
                continue
            x, g = token.pending.pop()
            params = {local: getattr(token.owner, local) for local in token.names}
            for start in range(0, x.shape[0], self.chunk_size):  # called inside _attached: token.embed is set
                grads = rules.token_gradients(token.embed, params, x[start:start + self.chunk_size],
                                              g[start:start + self.chunk_size])
                for local, value in grads.items():
                    sums[token.names[local]] += value.square().sum(dim=0)
                    self.visits[token.names[local]] = "tokens"

    def _unused(self, names: list[str], x, y, uniforms, ignore_index, autocast_dtype) -> set[str]:
        """Which of ``names`` have no path to the loss (such as a norm only the classification head uses): one
        forward with only those parameters requiring grad, once per model and parameter set (cached)."""
        from .fisher import image_loss, sample_labels, upsample_logits

        key = tuple(sorted(names))
        cache = _UNUSED_CACHE.setdefault(self.model, {})
        if key not in cache:
            flags = {p: p.requires_grad for p in self.model.parameters()}
            probe = [self.params[n] for n in names]
            try:
                for p in flags:
                    p.requires_grad_(False)
                for p in probe:
                    p.requires_grad_(True)
                with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                                    enabled=autocast_dtype is not None):  # the Eq. 6 shift changes no path
                    logits = upsample_logits(self.model(x[:1]).float(), tuple(y.shape[-2:]))
                target = y[:1].to(logits.device)
                if uniforms is not None:
                    target = sample_labels(logits, uniforms[:1].to(logits.device), target != ignore_index, ignore_index)
                loss = image_loss(logits, target, ignore_index)
                grads = (torch.autograd.grad(loss, probe, allow_unused=True) if loss.requires_grad
                         else [None] * len(probe))
            finally:
                for p, flag in flags.items():
                    p.requires_grad_(flag)
            cache[key] = {n for n, g in zip(names, grads) if g is None}
        return set(cache[key])

    # --- one batch -------------------------------------------------------------------------------------------
    def squared_gradient_sum(self, x: torch.Tensor, y: torch.Tensor, uniforms: torch.Tensor | None = None, *,
                             ignore_index: int = 255, shift: TokenShift | None = None,
                             shift_eps: tuple[torch.Tensor, torch.Tensor] | None = None,
                             autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """sum_i (d loss_i / d theta)^2 over the images of the batch, fp32, for every scored parameter."""
        from .fisher import image_loss, sample_labels, upsample_logits, vmap_squared_gradient_sum

        images = x.shape[0]
        sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.visits = {}
        flags = {p: p.requires_grad for p in self.model.parameters()}
        try:
            for p in flags:
                p.requires_grad_(False)
            with self._attached(sums, images), (shift if shift is not None else contextlib.nullcontext()):
                if shift is not None:
                    if shift_eps is None:
                        shift_eps = (torch.zeros(images, 1), torch.zeros(images, 1))
                    shift.eps = tuple(e.to(x.device) for e in shift_eps)
                x_in = x.detach().requires_grad_(True)
                with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                                    enabled=autocast_dtype is not None):
                    logits = self.model(x_in)
                logits = upsample_logits(logits.float(), tuple(y.shape[-2:]))
                target = y.to(logits.device)
                if uniforms is not None:
                    target = sample_labels(logits, uniforms.to(logits.device), target != ignore_index, ignore_index)
                loss = image_loss(logits, target, ignore_index)  # sum over images of each image's summed loss
                torch.autograd.grad(loss, x_in)
                del logits, loss
                self._finish_tokens(sums)
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        for site in self.sites:
            if site.failed or site.calls != 1:
                for full in site.names.values():
                    self.visits.pop(full, None)
                    sums[full].zero_()
        rest = [n for n in self.params if n not in self.visits]
        unused = self._unused(rest, x, y, uniforms, ignore_index, autocast_dtype) if rest else set()
        for n in unused:
            self.visits[n] = UNUSED  # no path to the loss: the gradient is exactly zero
        rest = [n for n in rest if n not in unused]
        if rest:
            extra = vmap_squared_gradient_sum(self.model, {n: self.params[n] for n in rest}, x, y, uniforms,
                                              ignore_index=ignore_index, shift=shift, shift_eps=shift_eps,
                                              chunk_size=self.chunk_size, autocast_dtype=autocast_dtype)
            for n in rest:
                sums[n] = extra[n]
                self.visits[n] = FALLBACK
        return sums
