"""Exact per-image squared gradients (Eq. 9) at about the cost of one training step: the hook engine.

One batched forward and one backward per batch. Neither the parameters nor the image require grad: the output of
the first scored layer becomes the autograd leaf, so autograd computes only activation gradients, from the loss
back to that layer, and skips the weight-gradient matmuls (a model that writes in place into that output makes
the engine take the image as the leaf instead, for good). Forward hooks keep each
scored layer's input; a hook on the layer's output receives the gradient g = d(sum_i loss_i)/d output, whose
rows for image i are d loss_i / d output_i, because each image's loss depends on that image alone (eval mode;
Eq. 6's batch spread is held constant). The layer's rule (``fisherscan.fisher.rules``) turns (input, g) into
per-image parameter gradients, a chunk of ``chunk_size`` images at a time, and their squares are added to fp32
accumulators; the kept input is freed as soon as its rule has run.

Prefix and position tokens enter where the backbone's family record says (``Family.token_layout``): in timm's
``_pos_embed(x)`` on the patch tokens, or added to the patch embedding's token map (SAM).

Never silently skipped. A module type without a rule (a GroupNorm, or SAM's attention in a configuration its rule
does not take, say) is recomputed image by image on its saved input, with autograd to its own parameters only
("recompute"). What remains (a module called more than once per forward, a parameter shared between modules or used
outside its module, a recompute that cannot be done) is computed exactly on the slowest path: torch.func vmap(grad)
restricted to those parameters (``fisherscan.fisher.vmap``, "fallback"). Parameters with no path to the loss are
found once per engine and get exact zeros ("unused"). ``HookEngine.visits`` records which way each parameter went.
Build one engine per model and run; it holds no batch between calls.

Label draws share the forward (``squared_gradient_sum_over_draws``): Eq. 9's expectation over y by K sampled label
maps of the same image needs K backward passes but one forward, the graph kept until the last backward, each kept
input until its rule has run for the last draw.

``fused=True`` (experimental, off by default) sums a Linear weight's per-image squares in one Triton kernel
(``fisherscan.fisher.fused``, "linear_fused") instead of materialising the per-image gradients, where it can run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from timm.layers import resample_abs_pos_embed_nhwc
from torch import nn

from ..models.families import architecture_family
from ..models.logits import upsample_logits
from . import fused, rules
from .loss import labelled_loss
from .perturb import TokenShift
from .vmap import VmapEngine, add_sums

FALLBACK = "fallback"
FUSED = "linear_fused"
RECOMPUTE = "recompute"
UNUSED = "unused"
TOKEN_NAMES = ("cls_token", "reg_token", "pos_embed")
MATMUL_RULES = (rules.linear, rules.conv2d)


def _tokens_of(out):
    """The token tensor of an embedding step's output (EVA's _pos_embed also returns its rotary embedding)."""
    return out[0] if isinstance(out, tuple) else out


def _records(tensor) -> bool:
    """Whether a hook should record this forward: grad mode on, a tensor that reaches the loss."""
    return torch.is_grad_enabled() and isinstance(tensor, torch.Tensor) and tensor.requires_grad


def _leaf(engine: HookEngine, tensor) -> torch.Tensor | None:
    """``tensor`` as a new autograd leaf (kept in ``engine.leaves``) when nothing before it needs a gradient: the
    first scored layer's output, since neither the input image nor any parameter requires grad. The backward then
    stops there -- no gradient of the image, none through unscored early layers. None: keep ``tensor``."""
    if (engine.paused or not engine.leaf_mode or not torch.is_grad_enabled() or not isinstance(tensor, torch.Tensor)
            or tensor.requires_grad or not tensor.is_floating_point()):
        return None
    leaf = tensor.detach().requires_grad_(True)
    engine.leaves.append(leaf)
    return leaf


@dataclass
class _Site:
    """One scored module: its rule and its parameters (local name -> full name)."""

    module: nn.Module
    rule: rules.Rule | str
    names: dict[str, str]
    hooked: nn.Module | None = None  # whose input and output gradient the rule reads (default: module)
    switches: dict = field(default_factory=dict)  # module attributes set while the engine runs
    calls: int = 0
    saved: torch.Tensor | None = None
    failed: bool = False
    call: tuple | None = None  # recompute sites: (other args, kwargs, autocast dtype or None) of the call

    def attach(self, engine: HookEngine, stack: contextlib.ExitStack) -> None:
        self.calls, self.saved, self.failed, self.call = 0, None, False, None
        hook = (self.hooked or self.module).register_forward_hook(
            lambda module, args, *rest: self.record(engine, args, *rest), with_kwargs=self.rule == RECOMPUTE)
        stack.callback(hook.remove)
        for attr, value in self.switches.items():
            stack.callback(setattr, self.module, attr, getattr(self.module, attr))
            setattr(self.module, attr, value)

    def record(self, engine: HookEngine, args: tuple, *rest) -> torch.Tensor | None:
        """Forward hook: keep the input and ask for the output's gradient (once per forward); returns the output
        made a leaf where it is the first to need a gradient (``_leaf``), else None (the output unchanged)."""
        output, kwargs = rest[-1], (rest[0] if len(rest) == 2 else {})
        leaf = _leaf(engine, output)
        self.keep(engine, args, kwargs, output if leaf is None else leaf)
        return leaf

    def keep(self, engine: HookEngine, args: tuple, kwargs: dict, output) -> None:
        if engine.paused or not _records(output):
            return
        self.calls += 1
        if self.calls > 1 or not args or not isinstance(args[0], torch.Tensor):
            self.failed = True
            return
        device = args[0].device.type
        if self.rule == RECOMPUTE:
            others = [*args[1:], *kwargs.values()]
            if any(isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == args[0].shape[0] for t in others):
                self.failed = True  # another batched input: slicing it is not safe to guess
                return
            autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            self.call = (args[1:], kwargs, autocast)
        x = args[0].detach()
        if self.rule in MATMUL_RULES and x.is_floating_point() and torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))  # what the matmul read; half the memory of fp32
        self.saved = x
        output.register_hook(lambda g: self.apply(engine, g))

    def apply(self, engine: HookEngine, g: torch.Tensor) -> None:
        """Output-gradient hook: the rule on (kept input, g), a chunk of images at a time, squared into the sums
        (the input kept for the next label draw's backward, freed after the last)."""
        x = self.saved
        if engine.last_draw:
            self.saved = None
        images = engine.images
        if self.failed or x is None or x.shape[0] != g.shape[0] or x.shape[0] % images:
            self.failed = True
            return
        k = x.shape[0] // images
        if self.rule == RECOMPUTE:
            self.recompute(engine, x, g, k)
            return
        if engine.fused and self.rule is rules.linear and "weight" in self.names and fused.available(g):
            self.fused_linear(engine, x, g)
            return
        for start in range(0, images, engine.chunk_size):
            n = min(engine.chunk_size, images - start)
            grads = self.rule(self.module, x[start * k:(start + n) * k], g[start * k:(start + n) * k], n)
            for local, value in grads.items():  # rules return tensors of their own: squared in place
                engine.sums[self.names[local]] += value.float().square_().sum(dim=0)
                engine.visits[self.names[local]] = self.rule.__name__

    def fused_linear(self, engine: HookEngine, x: torch.Tensor, g: torch.Tensor) -> None:
        """The Linear rule with its weight's squares summed in one Triton kernel (``fisherscan.fisher.fused``):
        no per-image weight gradient is materialised; the bias by the rule."""
        weight = self.names["weight"]
        fused.add_squared_weight_gradients(engine.sums[weight], g, x, engine.images)
        engine.visits[weight] = FUSED
        for local, value in rules.linear_bias(self.module, g, engine.images).items():
            engine.sums[self.names[local]] += value.square_().sum(dim=0)
            engine.visits[self.names[local]] = rules.linear.__name__

    def recompute(self, engine: HookEngine, x: torch.Tensor, g: torch.Tensor, k: int) -> None:
        """The exact path for a module without a rule: per image, its forward again on that image's rows of the
        saved input (other layers' hooks paused) and autograd to its own parameters only, with the output
        gradient as the cotangent. Any failure leaves the parameters to the vmap fallback."""
        args, kwargs, autocast = self.call
        if engine.last_draw:
            self.call = None
        params = {local: getattr(self.module, local) for local in self.names}
        grads = {local: [] for local in params}
        try:
            engine.paused = True
            for p in params.values():
                p.requires_grad_(True)
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=autocast or torch.bfloat16,
                                                     enabled=autocast is not None):
                for i in range(engine.images):
                    out = self.module.forward(x[i * k:(i + 1) * k], *args, **kwargs)
                    values = torch.autograd.grad(out, list(params.values()), g[i * k:(i + 1) * k].to(out.dtype),
                                                 allow_unused=True)
                    for local, value in zip(params, values):
                        grads[local].append(torch.zeros_like(params[local]) if value is None else value)
        except RuntimeError:
            self.failed = True
            return
        finally:
            engine.paused = False
            for p in params.values():
                p.requires_grad_(False)
        for local, values in grads.items():
            engine.sums[self.names[local]] += torch.stack(values).float().square_().sum(dim=0)
            engine.visits[self.names[local]] = RECOMPUTE


@dataclass
class _TokenSite:
    """Prefix and position tokens of ``owner`` that enter through ``embed(x)``, x the tokens a hook sees:
    ``"prefix"`` layout, timm's ``owner._pos_embed`` (wrapped while attached); ``"grid"``, the patch embedding's
    token map plus the resampled position table."""

    owner: nn.Module
    layout: str
    names: dict[str, str]
    calls: int = 0
    pending: list = field(default_factory=list)
    embed: object = None

    def attach(self, engine: HookEngine, stack: contextlib.ExitStack) -> None:
        self.calls, self.pending = 0, []
        if self.layout == "grid":  # x = patch_embed(x) + pos_embed (resampled to the token map)
            self.embed = lambda x: x + resample_abs_pos_embed_nhwc(self.owner.pos_embed, x.shape[1:3])
            hook = self.owner.patch_embed.register_forward_hook(lambda m, args, out: self.keep(engine, out, out))
            stack.callback(hook.remove)
            return
        original = self.owner._pos_embed
        self.embed = lambda x: _tokens_of(original(x))

        def pos_embed(x):
            return self.keep(engine, x, original(x))

        self.owner._pos_embed = pos_embed
        stack.callback(delattr, self.owner, "_pos_embed")

    def keep(self, engine: HookEngine, x: torch.Tensor, out):
        """Keep the tokens ``x`` and ask for the gradient at ``out``'s tokens; returns ``out`` (its tokens a leaf
        where they are the first to need a gradient)."""
        tensor = _tokens_of(out)
        leaf = _leaf(engine, tensor)
        if leaf is not None:
            tensor, out = leaf, ((leaf, *out[1:]) if isinstance(out, tuple) else leaf)
        if not engine.paused and _records(tensor):
            self.calls += 1
            saved = x.detach()
            tensor.register_hook(lambda g: self.pending.append((saved, g)))
        return out

    def finish(self, engine: HookEngine) -> None:
        """After the backward: per-image gradients of the tokens by ``rules.token_gradients``."""
        if self.calls != 1 or len(self.pending) != 1:
            return
        x, g = self.pending.pop()
        params = {local: getattr(self.owner, local) for local in self.names}
        for start in range(0, x.shape[0], engine.chunk_size):
            grads = rules.token_gradients(self.embed, params, x[start:start + engine.chunk_size],
                                          g[start:start + engine.chunk_size])
            for local, value in grads.items():
                engine.sums[self.names[local]] += value.square().sum(dim=0)
                engine.visits[self.names[local]] = "tokens"


def _shared(model: nn.Module, name_of: dict[int, str]) -> set[str]:
    """Scored parameters that belong to more than one module (no single layer's rule can see all their uses)."""
    owners: dict[str, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in name_of:
                owners[name_of[id(p)]] = owners.get(name_of[id(p)], 0) + 1
    return {n for n, count in owners.items() if count > 1}


def _token_site(module: nn.Module, tokens: dict[str, str]) -> _TokenSite | None:
    family = architecture_family(module)
    layout = family.token_layout if family is not None else None
    if layout == "prefix" and callable(getattr(type(module), "_pos_embed", None)):
        return _TokenSite(module, layout, tokens)
    if layout == "grid" and set(tokens) == {"pos_embed"}:
        return _TokenSite(module, layout, tokens)
    return None


def plan_sites(model: nn.Module, params: dict[str, torch.Tensor]) -> tuple[list[_Site], list[_TokenSite], dict]:
    """(rule sites, token sites, full name -> planned path) for the scored ``params`` of ``model``."""
    name_of = {id(p): n for n, p in params.items()}
    shared = _shared(model, name_of)
    sites, token_sites, planned = [], [], {}
    for module in model.modules():
        direct = {local: name_of[id(p)] for local, p in module.named_parameters(recurse=False)
                  if id(p) in name_of and name_of[id(p)] not in shared}
        tokens = {k: v for k, v in direct.items() if k in TOKEN_NAMES}
        token_site = _token_site(module, tokens) if tokens else None
        if token_site is not None:
            token_sites.append(token_site)
            planned.update({full: "tokens" for full in tokens.values()})
            direct = {k: v for k, v in direct.items() if k not in tokens}
        dispatch = rules.rule_for(module)
        if not direct or (dispatch is None and module is model):  # recomputing the whole model: the per-image
            continue  # loop, left to the vmap fallback
        if dispatch is None:  # no rule: image by image, autograd through this module alone
            site = _Site(module, RECOMPUTE, direct)
        else:
            hooked = getattr(module, dispatch.hooked) if dispatch.hooked else None
            site = _Site(module, dispatch.rule, direct, hooked=hooked, switches=dispatch.switches)
        sites.append(site)
        planned.update({full: getattr(site.rule, "__name__", RECOMPUTE) for full in direct.values()})
    return sites, token_sites, planned


@contextlib.contextmanager
def _only_requiring_grad(model: nn.Module, params: list[torch.Tensor]):
    """Inside: only ``params`` of ``model`` require grad; afterwards every flag is as it was."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


class HookEngine:
    """The hook engine for ``model`` and the scored parameters ``params`` (full name -> parameter)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], chunk_size: int = 8, fused: bool = False):
        self.model, self.params, self.chunk_size = model, dict(params), max(1, int(chunk_size))
        self.fused = fused  # Linear weights by the fused Triton kernel where it can run (experimental)
        self.sites, self.token_sites, self.planned = plan_sites(model, self.params)
        self.visits: dict[str, str] = {}
        self.paused = False
        self.leaf_mode = True  # backward from the first scored layer (False: from the input image, see _leaf)
        self.leaves: list[torch.Tensor] = []
        self.sums: dict[str, torch.Tensor] = {}
        self.images = 0
        self.last_draw = True  # the backward of the forward's last label draw: kept inputs can go
        self.last_loss: torch.Tensor | None = None
        self._unused_cache: dict[tuple[str, ...], set[str]] = {}

    def squared_gradient_sum(self, x: torch.Tensor, y: torch.Tensor, uniforms: torch.Tensor | None = None, *,
                             ignore_index: int = 255, shift: TokenShift | None = None,
                             shift_eps: tuple[torch.Tensor, ...] | None = None,
                             autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """sum_i (d loss_i / d theta)^2 over the images of the batch, fp32, for every scored parameter."""
        return self.squared_gradient_sum_over_draws(x, y, [uniforms], ignore_index=ignore_index, shift=shift,
                                                    shift_eps=shift_eps, autocast_dtype=autocast_dtype)

    def squared_gradient_sum_over_draws(self, x: torch.Tensor, y: torch.Tensor,
                                        draws: Sequence[torch.Tensor | None], *, ignore_index: int = 255,
                                        shift: TokenShift | None = None,
                                        shift_eps: tuple[torch.Tensor, ...] | None = None,
                                        autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """sum_k sum_i (d loss_i(y_ik) / d theta)^2 for the label draws k (each draw's uniforms, or None for y):
        Eq. 9's expectation over y by len(draws) samples, before the 1/K. One forward serves every draw, one
        backward each; the same values, bit for bit, as the sum of ``squared_gradient_sum`` over the draws in order.
        """
        self.images = x.shape[0]
        if shift is not None and shift_eps is None:
            shift_eps = (torch.zeros(self.images, 1), torch.zeros(self.images, 1))
        try:
            sums = self._hooked_pass(x, y, draws, ignore_index, shift, shift_eps, autocast_dtype)
        except RuntimeError as error:
            if not self.leaf_mode or "leaf Variable" not in str(error):
                raise
            self.leaf_mode = False  # the model writes in place into a leaf: the backward from the image, for good
            sums = self._hooked_pass(x, y, draws, ignore_index, shift, shift_eps, autocast_dtype)
        for site in self.sites:
            if site.failed or site.calls != 1:
                for full in site.names.values():
                    self.visits.pop(full, None)
                    sums[full].zero_()
        rest = [n for n in self.params if n not in self.visits]
        unused = self._unused(rest, x, y, draws[0], ignore_index, autocast_dtype) if rest else set()
        self.visits.update(dict.fromkeys(unused, UNUSED))  # no path to the loss: the gradient is exactly zero
        rest = [n for n in rest if n not in unused]
        if rest:
            extra = VmapEngine(self.model, {n: self.params[n] for n in rest}, self.chunk_size) \
                .squared_gradient_sum_over_draws(x, y, draws, ignore_index=ignore_index, shift=shift,
                                                 shift_eps=shift_eps, autocast_dtype=autocast_dtype)
            for n in rest:
                sums[n] = extra[n]
                self.visits[n] = FALLBACK
        return sums

    def _hooked_pass(self, x, y, draws, ignore_index, shift, shift_eps, autocast_dtype) -> dict[str, torch.Tensor]:
        """One batched forward, then one backward per label draw, with the sites' hooks attached: the rules fill
        ``self.sums`` in each backward; returns their sum over the draws (added in draw order)."""
        self.visits, self.leaves, total = {}, [], None
        with _only_requiring_grad(self.model, []), contextlib.ExitStack() as stack:
            for site in [*self.sites, *self.token_sites]:
                site.attach(self, stack)
            if shift is not None:
                stack.enter_context(shift)
                shift.eps = tuple(e.to(x.device) for e in shift_eps)
            x_in = x.detach() if self.leaf_mode else x.detach().requires_grad_(True)
            logits = self._logits(x_in, tuple(y.shape[-2:]), autocast_dtype)
            targets = self.leaves if self.leaf_mode else [x_in]
            for k, uniforms in enumerate(draws):
                self.last_draw = k == len(draws) - 1
                self.sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
                loss = labelled_loss(logits, y, uniforms, ignore_index)  # sum over images of each one's
                if loss.requires_grad and targets:
                    torch.autograd.grad(loss, targets, allow_unused=True, retain_graph=not self.last_draw)
                self.last_loss = loss.detach()  # the batch's summed loss (the VOGN curvature records it)
                del loss
                for token in self.token_sites:
                    token.finish(self)
                total = add_sums(total, self.sums)
            self.leaves, self.sums, self.last_draw = [], {}, True
        return total

    def _logits(self, x, size: tuple[int, int], autocast_dtype) -> torch.Tensor:
        """The model's logits upsampled to the label ``size``, fp32, the model run in ``autocast_dtype`` (or fp32)."""
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = self.model(x)
        return upsample_logits(logits.float(), size)

    def _loss(self, x, y, uniforms, ignore_index, autocast_dtype) -> torch.Tensor:
        """Eq. 9's loss summed over the batch's images."""
        return labelled_loss(self._logits(x, tuple(y.shape[-2:]), autocast_dtype), y, uniforms, ignore_index)

    def _unused(self, names: list[str], x, y, uniforms, ignore_index, autocast_dtype) -> set[str]:
        """Which of ``names`` have no path to the loss (such as a norm only the classification head uses): one
        forward of one image with only those parameters requiring grad, once per parameter set (kept)."""
        key = tuple(sorted(names))
        if key not in self._unused_cache:
            probe = [self.params[n] for n in names]
            with _only_requiring_grad(self.model, probe):  # the Eq. 6 shift changes no path
                loss = self._loss(x[:1], y[:1], None if uniforms is None else uniforms[:1], ignore_index,
                                  autocast_dtype)
                grads = (torch.autograd.grad(loss, probe, allow_unused=True) if loss.requires_grad
                         else [None] * len(probe))
            self._unused_cache[key] = {n for n, g in zip(names, grads) if g is None}
        return set(self._unused_cache[key])
