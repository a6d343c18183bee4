"""Small Vision Transformers, registered in timm as the ``smallvit*`` family.

``smallvit`` is the Vision Transformer of the "Vision Transformers" chapter of Dive into Deep Learning
(d2l.ai, section 11.8), built as timm's ``VisionTransformer`` from this module's parts. An image goes through:

    PatchEmbed    conv with kernel = stride = patch size, with bias        (B, C, H, W) -> (B, N, D)
    prefix        class token, then a learnable position embedding for N + 1 tokens, then dropout
    Block x depth pre-norm:  x = x + Attention(LayerNorm(x));  x = x + Mlp(LayerNorm(x))
      Attention   fused q/k/v projection and output projection, both without bias; dropout on attention weights
                  (PyTorch's fused kernel, or the explicit softmax path for bfloat16 on the CPU: see attend)
      Mlp         Linear -> GELU -> dropout -> Linear -> dropout, both linear layers with bias
    head          LayerNorm, class token (or mean of patch tokens), Linear to the classes

With the class token as the pooled feature, ``forward`` runs the last block for that token alone (its query against
every token's key and value, then its MLP): the head reads nothing else, so the logits are the same for about 40%
less work at the seed shape. ``forward_features`` returns every token, as in timm (see ``trim_last_block``).

:class:`SmallViT` subclasses timm's ``VisionTransformer`` and overrides little more than ``forward``, so the state
dict has its key names and shapes, and weights move either way: the seed is ``VisionTransformer(qkv_bias=False,
norm_layer=partial(LayerNorm, eps=1e-5))`` with its attention output projection bias at zero. See
:func:`to_vision_transformer` and :func:`checkpoint_filter_fn`.
"""

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.layers import ConvNormAct, LayerNorm, register_notrace_function, to_2tuple
from timm.layers import Mlp as TimmMlp
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models import (
    build_model_with_cfg,
    checkpoint,
    generate_default_cfgs,
    list_pretrained,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_checkpoint_filter_fn
from torch.jit import Final

from .data import FASHION_MNIST_CLASSES

__all__ = [
    'SmallViT',
    'checkpoint_filter_fn',
    'convert_d2l_state_dict',
    'explicit_attention',
    'model_blocks',
    'to_vision_transformer',
]

PoolType = Literal['token', 'avg', 'max', 'avgmax', '']
POOL_TYPES: tuple[PoolType, ...] = ('token', 'avg', 'max', 'avgmax', '')
POOL_ALIASES: dict[str, PoolType] = {'cls': 'token', 'mean': 'avg'}


def resolve_global_pool(global_pool: str | None, class_token: bool) -> PoolType:
    """Map a pooling name (or an alias) to timm's name, defaulting to the class token when there is one."""
    if global_pool is None:
        return 'token' if class_token else 'avg'
    pools: dict[str, PoolType] = {**{p: p for p in POOL_TYPES}, **POOL_ALIASES}
    pool = pools.get(global_pool)
    if pool is None:
        raise ValueError(
            f"Unknown global_pool {global_pool!r}. Valid: 'token' (alias 'cls'), 'avg' (alias 'mean'), "
            f"'max', 'avgmax', or '' for no pooling."
        )
    if pool == 'token' and not class_token:
        raise ValueError("global_pool='token' needs a class token: use class_token=True or global_pool='avg'.")
    return pool


@torch.fx.wrap  # a leaf for any fx tracer (timm's and torchvision's): its checks run on real shapes, not proxies
@register_notrace_function
def check_input(x: torch.Tensor, in_chans: int, img_size: tuple[int, int] | None, strict_img_size: bool) -> None:
    """Say what input was expected and how to fix it, before conv or patch errors that name neither."""
    torch._assert(
        x.dim() == 4,
        f'Expected an image batch of shape (batch, {in_chans}, height, width), got {x.dim()} dimensions.',
    )
    torch._assert(
        x.shape[1] == in_chans,
        f'Expected {in_chans} input channel(s), got {x.shape[1]}. Create the model with '
        f'in_chans={x.shape[1]} (pretrained patch weights are adapted) or convert the images.',
    )
    if strict_img_size and img_size is not None:
        torch._assert(
            x.shape[2] == img_size[0] and x.shape[3] == img_size[1],
            f'Expected {img_size[0]}x{img_size[1]} images, got {x.shape[2]}x{x.shape[3]}. Resize them, or '
            f'create the model with img_size={x.shape[2]} or dynamic_img_size=True.',
        )


class PatchEmbed(TimmPatchEmbed):
    """timm's PatchEmbed, checking its input with :func:`check_input` first.

    The check is a forward pre-hook: a ``forward`` calling ``super().forward`` would not compile in TorchScript.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_forward_pre_hook(_check_patch_embed_input)


def _check_patch_embed_input(module: PatchEmbed, args: tuple[torch.Tensor]) -> None:
    check_input(args[0], module.proj.in_channels, module.img_size, module.strict_img_size)


class ConvStem(nn.Module):
    """Patch embedding by a few 3x3 convolutions instead of one large-kernel conv.

    "Early Convolutions Help Transformers See Better" (Xiao et al., 2021): a small conv stem gives a ViT the
    locality a patchify conv lacks, which pays on small data. ``stem_chs`` conv-BN-GELU layers (stride 1 or 2),
    then a stride-2 conv to ``embed_dim``; the patch size is the total stride. With channels (16, 32, 64) and
    strides (1, 2, 2) a 28 px image becomes a 4x4 grid (28 -> 28 -> 14 -> 7 -> 4). Same interface as timm's
    PatchEmbed (timm's ViT builds it as its ``embed_layer``); it checks its input with :func:`check_input` first.
    ``patch_size``, if given, must be the total stride; ``dynamic_img_pad`` has nothing to do (each stride-2 conv pads).
    """

    def __init__(
        self,
        img_size: tuple[int, int] | None = (28, 28),
        in_chans: int = 1,
        embed_dim: int = 128,
        stem_chs: tuple[int, ...] = (32, 64),
        stem_strides: tuple[int, ...] | None = None,
        output_fmt: str | None = None,
        strict_img_size: bool = True,
        patch_size: int | tuple[int, int] | None = None,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {'device': device, 'dtype': dtype}
        self.in_chans = in_chans
        stem_strides = stem_strides or (2,) * len(stem_chs)
        if len(stem_strides) != len(stem_chs) or not set(stem_strides) <= {1, 2}:
            raise ValueError(f'stem_strides {stem_strides}: one stride, 1 or 2, per stem channel count {stem_chs}.')
        layers = []
        chs = in_chans
        for out_chs, s in zip(stem_chs, stem_strides, strict=True):
            layers.append(ConvNormAct(chs, out_chs, kernel_size=3, stride=s, padding=1, act_layer=nn.GELU, **dd))
            chs = out_chs
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(chs, embed_dim, kernel_size=3, stride=2, padding=1, bias=bias, **dd)
        stride = 2 * math.prod(stem_strides)
        self.patch_size = (stride, stride)
        if patch_size is not None and tuple(to_2tuple(patch_size)) != self.patch_size:
            raise ValueError(f'This conv stem has a total stride of {stride}: patch_size.')
        self.flatten = output_fmt is None
        self.output_nhwc = output_fmt == 'NHWC'
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = False
        self.img_size: tuple[int, int] | None = None
        self.grid_size: tuple[int, int] = (0, 0)
        self.num_patches = 0
        self.set_input_size(img_size)

    def feat_ratio(self, as_scalar: bool = True) -> int:
        return self.patch_size[0]

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        # a stride-2 conv with padding 1 maps n to ceil(n / 2), a stride-1 conv keeps n
        return math.ceil(img_size[0] / self.patch_size[0]), math.ceil(img_size[1] / self.patch_size[1])

    @torch.jit.ignore
    def set_input_size(self, img_size: tuple[int, int] | None = None, patch_size: Any | None = None) -> None:
        if patch_size is not None and tuple(to_2tuple(patch_size)) != self.patch_size:
            raise ValueError('A conv stem has a fixed stride; set_input_size cannot change its patch size.')
        if img_size is not None:
            self.img_size = tuple(to_2tuple(img_size))
            self.grid_size = self.dynamic_feat_size(self.img_size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans, self.img_size, self.strict_img_size)
        x = self.proj(self.stem(x))  # (B, D, H', W')
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        elif self.output_nhwc:
            x = x.permute(0, 2, 3, 1)
        return x


@register_notrace_function  # a leaf for fx: the mask is drawn for real tensors, not proxies
def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` with a mask that costs a quarter of the random draws on the CPU.

    PyTorch's CPU generator draws serially, one 32-bit number per element for ``bernoulli_``: that made dropout 23%
    of a bf16 training step of the seed model (batch 64, rate 0.1 in 7 places). Here one 64-bit draw masks four
    elements, each kept when its 16 bits clear ``p`` (rates are exact to 1/65536). Kept elements are scaled by
    1 / (1 - p) as held in ``x``'s dtype (in bfloat16 1/0.9 is 1.109). On other devices this is ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != 'cpu' or p >= 1.0 or torch.compiler.is_compiling():
        # under torch.compile inductor draws the mask inside its fused kernel; random_ would break the graph
        return F.dropout(x, p, training=True)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-9223372036854775807 - 1, None)  # all 64 bits
    threshold = int(p * 65536 + 0.5) - 32768  # int16 values below it are dropped: p of them
    keep = bits.view(torch.int16)[:n].view(x.shape) >= threshold
    # one multiply by a mask that holds the scale: half the time of torch.where forward and backward
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same place in the state) drawing its mask with :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


@torch.fx.wrap  # a leaf for any fx tracer (torchvision's too): the kernel is chosen on real tensors, not proxies
@register_notrace_function
def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    dropout_p: float,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """The fused path of :class:`Attention`: softmax(q k^T * scale + mask) v over (B, heads, N, head_dim).

    ``F.scaled_dot_product_attention``, except for bfloat16 on the CPU: there PyTorch's flash kernel is slow at a few
    dozen tokens (its backward was 28% of a bf16 training step of smallvit_small_patch4_28 at batch 128), and the
    explicit path trains that model 1.4-1.5x faster. In float32 the two are level on the CPU; on CUDA the fused
    kernel is the fast one.
    """
    if not (q.device.type == 'cpu' and q.dtype == torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
    attn = maybe_add_mask(attn, resolve_self_attn_mask(q.shape[-2], attn, attn_mask, is_causal))
    attn = attn.softmax(dim=-1)
    attn = dropout(attn, dropout_p)
    return attn @ v


class Attention(TimmAttention):
    """timm's multi-head self-attention (same parameters, names and arguments), with a faster kernel choice.

    The explicit path (``fused_attn=False``) is timm's own, line for line, so hooks on ``attn_drop`` and fx nodes named
    ``attn.softmax`` (what ``timm.utils.AttentionExtract`` looks for) see every attention map; the fused path goes
    through :func:`attend`. Dropout masks are drawn with :func:`dropout`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attn_drop = Dropout(self.attn_drop.p)
        self.proj_drop = Dropout(self.proj_drop.p)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = attend(q, k, v, self.scale, self.attn_drop.p if self.training else 0.0, attn_mask, is_causal)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)  # (B, heads, N, N)
            attn_bias = resolve_self_attn_mask(N, attn, attn_mask, is_causal)
            attn = maybe_add_mask(attn, attn_bias)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def forward_prefix(self, x: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The output for the first ``num_tokens`` tokens only, each attending to all of ``x``.

        Queries are projected for those tokens alone (keys and values for all): the same numbers as
        ``forward(x)[:, :num_tokens]`` at a third of the projection and 1/N of the rest.
        """
        B, N, _ = x.shape
        d = self.attn_dim
        bias = self.qkv.bias
        q_bias: torch.Tensor | None = None
        kv_bias: torch.Tensor | None = None
        if bias is not None:
            q_bias, kv_bias = bias[:d], bias[d:]
        q = F.linear(x[:, :num_tokens], self.qkv.weight[:d], q_bias)  # (B, n, d): qkv's rows are q, k, v in order
        q = q.reshape(B, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, n, head_dim)
        kv = F.linear(x, self.qkv.weight[d:], kv_bias).reshape(B, N, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if self.fused_attn:
            x = attend(q, k, v, self.scale, self.attn_drop.p if self.training else 0.0)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, n, N)
            x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(B, num_tokens, self.attn_dim)
        return self.proj_drop(self.proj(x))


_SEED_LAYER_NORM = partial(LayerNorm, eps=1e-5)


class Mlp(TimmMlp):
    """timm's Mlp with biases on both linear layers, drawing its dropout masks with :func:`dropout`.

    timm's ViT Block hands its MLP ``bias=proj_bias``, the attention output projection's setting. The seed has MLP
    biases and no attention output bias, so ``bias`` is not read here: both linear layers always have one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, 'bias': True})
        self.drop1, self.drop2 = Dropout(self.drop1.p), Dropout(self.drop2.p)


class Block(TimmBlock):
    """timm's pre-norm ViT block with the seed's parts, and :meth:`forward_prefix` for the trimmed last block.

    Defaults are the seed's: :class:`Attention` without output projection bias, :class:`Mlp` (with biases),
    LayerNorm eps 1e-5. The attention output has no dropout (``proj_drop`` is the MLP's only): d2l drops out the
    attention weights and each MLP layer's output, where timm's block also drops out the attention output.
    """

    if TYPE_CHECKING:  # the parts as built here (timm types them nn.Module); for the type checker only, as below
        attn: Attention
        mlp: Mlp

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        proj_bias: bool = False,
        norm_layer: type[nn.Module] | Callable[..., nn.Module] = _SEED_LAYER_NORM,
        mlp_layer: type[nn.Module] = Mlp,
        attn_layer: type[nn.Module] = Attention,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            proj_bias=proj_bias,
            norm_layer=norm_layer,  # type: ignore[arg-type]  # timm annotates a class, and takes a partial too
            mlp_layer=mlp_layer,
            attn_layer=attn_layer,
            **kwargs,
        )
        self.attn.proj_drop = Dropout(0.0)

    def forward_prefix(self, x: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """``forward(x)[:, :num_tokens]``, computing the attention output and the MLP for those tokens only."""
        x = x[:, :num_tokens] + self.drop_path1(self.ls1(self.attn.forward_prefix(self.norm1(x), num_tokens)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class SmallViT(VisionTransformer):
    """Vision Transformer for small images, the seed model of d2l.ai's chapter 11.8, as a timm ``VisionTransformer``.

    timm's ViT code throughout, built from this module's parts (:class:`PatchEmbed` or :class:`ConvStem`,
    :class:`Block`, :class:`Attention`, :class:`Mlp`, :class:`Dropout`). Overridden: ``forward``, which computes the
    last block for the class token alone when nothing can see the other tokens (``trim_last_block``);
    ``reset_classifier``, for the pooling aliases; ``no_weight_decay``, naming only parameters the model has.
    """

    # TorchScript reads the annotations of the class itself only, once it has any: timm's constant is named again
    dynamic_img_size: Final[bool]  # type: ignore[misc]  # mypy: "cannot override final attribute"
    trim_last_block: Final[bool]
    if TYPE_CHECKING:  # for the type checker only: a class annotation would become a TorchScript attribute type
        pretrained_cfg: dict[str, Any]  # set by timm's build_model_with_cfg

    def __init__(
        self,
        img_size: int | tuple[int, int] = 96,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 1,
        num_classes: int = 10,
        global_pool: str | None = None,
        embed_dim: int = 512,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = False,
        class_token: bool = True,
        stem_chs: tuple[int, ...] | None = None,
        stem_strides: tuple[int, ...] | None = None,
        fc_norm: bool | None = None,
        norm_eps: float = 1e-5,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        fused_attn: bool | None = None,
        trim_last_block: bool = True,
        weight_init: str = '',
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            img_size: Input image size.
            patch_size: Patch size (the patch embedding's kernel and stride).
            in_chans: Input image channels.
            num_classes: Classifier outputs; 0 for a model that returns pooled features.
            global_pool: 'token' (class token, alias 'cls'), 'avg' (mean of patch tokens, alias 'mean'), 'max',
                'avgmax', or '' for none. Default: 'token' with a class token, else 'avg'.
            embed_dim: Token width.
            depth: Number of transformer blocks.
            num_heads: Attention heads per block.
            mlp_ratio: MLP hidden width over embed_dim.
            qkv_bias: Bias on the q/k/v projection.
            proj_bias: Bias on the attention output projection (the MLP layers always have biases).
            class_token: Prepend a class token.
            stem_chs: Channels of a conv stem (:class:`ConvStem`) that replaces the patchify conv; patch_size must
                then be its total stride.
            stem_strides: Stride (1 or 2) of each stem layer; default 2 for all.
            fc_norm: Put the final LayerNorm after pooling instead of before; default on for mean/max pooling,
                as in timm.
            norm_eps: LayerNorm epsilon.
            dynamic_img_size: Accept any image size divisible by the patch size, resampling the position
                embedding on the fly.
            dynamic_img_pad: Pad images up to a multiple of the patch size.
            drop_rate: Dropout before the classifier.
            pos_drop_rate: Dropout after adding the position embedding.
            proj_drop_rate: Dropout after each MLP linear layer.
            attn_drop_rate: Dropout on the attention weights.
            drop_path_rate: Stochastic depth rate, rising linearly to this value over the blocks.
            fused_attn: Use F.scaled_dot_product_attention (True; bfloat16 on the CPU still takes the explicit
                path, which is faster there: see :func:`attend`) or always the explicit softmax path (False);
                None takes timm's global setting (fused unless TIMM_FUSED_ATTN=0).
            trim_last_block: With class-token pooling, ``forward`` runs the last block for the class token alone,
                the only token the head reads: the same logits and gradients with less work (the seed's second
                block costs about a fifth of the first). ``forward_features`` and ``forward_intermediates`` still
                return every token; False also makes ``forward`` do so (for hooks on the last block).
            weight_init: '' for timm's ViT init, 'skip' to leave PyTorch's defaults.
            device: Device to create the parameters on, as timm's create_model(..., device=...) passes it.
            dtype: Dtype of the parameters, as timm's create_model(..., dtype=...) passes it.
        """
        if weight_init not in ('', 'skip'):
            raise ValueError(f"Unknown weight_init {weight_init!r}; valid: '' (timm's ViT init) or 'skip'.")
        pool = resolve_global_pool(global_pool, class_token)
        embed_layer: Callable[..., nn.Module] = PatchEmbed
        if stem_chs:
            embed_layer = partial(
                ConvStem, stem_chs=tuple(stem_chs), stem_strides=tuple(stem_strides) if stem_strides else None
            )
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=pool,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            class_token=class_token,
            fc_norm=fc_norm,
            dynamic_img_size=dynamic_img_size,
            dynamic_img_pad=dynamic_img_pad,
            drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            weight_init='skip' if weight_init == 'skip' else '',
            embed_layer=embed_layer,
            norm_layer=partial(LayerNorm, eps=norm_eps),
            block_fn=Block,
            mlp_layer=Mlp,
            attn_layer=Attention,
            device=device,
            dtype=dtype,
        )
        self.pos_drop = Dropout(pos_drop_rate)
        self.head_drop = Dropout(drop_rate)
        self.trim_last_block = trim_last_block
        if fused_attn is not None:
            self.set_fused_attn(fused_attn)

    @torch.jit.ignore
    def set_fused_attn(self, enable: bool = True) -> None:
        """Switch every block between fused attention and the explicit softmax path (same results)."""
        for block in model_blocks(self):
            block.attn.fused_attn = enable  # type: ignore[misc]  # timm's Final: constant once scripted

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's names, less those this model has no parameter for (register and distillation tokens)."""
        params = dict(self.named_parameters())
        return {name for name in super().no_weight_decay() if name in params}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's, also taking the pooling aliases 'cls' and 'mean' (and failing with the valid names listed)."""
        if global_pool is not None:
            global_pool = resolve_global_pool(global_pool, self.has_class_token)  # raises before any change
        super().reset_classifier(num_classes, global_pool)

    def forward_class_token(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_features(x)[:, :1]``, with the last block computing the class token's output alone."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)  # (B, 1 + N, D)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x) if i < last else checkpoint(blk.forward_prefix, x, 1)
            else:
                # blocks holds Block modules, which nn.Sequential yields typed as nn.Module (no narrowing here:
                # TorchScript compiles this loop)
                x = blk(x) if i < last else blk.forward_prefix(x, 1)  # type: ignore[operator]
        return self.norm(x)  # (B, 1, D)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        trim = False
        if self.trims_last_block() and attn_mask is None and not is_causal and not torch.jit.is_scripting():
            trim = self._unobserved(x)
        if trim:
            x = self.forward_class_token(x)
        else:
            x = self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.forward_head(x)

    def trims_last_block(self) -> bool:
        """Whether forward computes the last block for the class token alone, when nothing observes it."""
        return self.trim_last_block and self.global_pool == 'token' and self.has_class_token and len(self.blocks) > 0

    @torch.jit.unused
    def _unobserved(self, x: torch.Tensor) -> bool:
        """Whether nothing can see the last block's other tokens: no fx trace, no hook on what the trim changes."""
        if isinstance(x, torch.fx.Proxy):  # timm's and torchvision's feature extractors, AttentionExtract(fx)
            return False
        module_hooks = torch.nn.modules.module
        if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
            return False
        watched = (self.blocks, self.norm, *self.blocks[-1].modules())
        return not any(
            m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in watched
        )


def model_blocks(model: SmallViT) -> list[Block]:
    """The model's transformer blocks as :class:`Block` (nn.Sequential yields them typed as nn.Module)."""
    blocks = []
    for blk in model.blocks:
        if not isinstance(blk, Block):
            raise TypeError(f'{type(model).__name__}.blocks holds a {type(blk).__name__}, not a smallvit Block.')
        blocks.append(blk)
    return blocks


@contextlib.contextmanager
def explicit_attention(model: SmallViT) -> Iterator[None]:
    """Run the model on the explicit softmax path (what hooks, fx and FlopCounterMode see into), then restore it.

    Each block's own fused-attention setting comes back afterwards, as it was.
    """
    blocks = model_blocks(model)
    fused = [blk.attn.fused_attn for blk in blocks]
    model.set_fused_attn(False)
    try:
        yield
    finally:
        for blk, flag in zip(blocks, fused, strict=True):
            blk.attn.fused_attn = flag  # type: ignore[misc]  # timm's Final: constant once scripted


# Dive into Deep Learning's ViT (d2l.ai 11.8) names its parameters differently; a one-to-one rename suffices.
D2L_KEY_MAP = {
    'patch_embedding.conv.weight': 'patch_embed.proj.weight',
    'patch_embedding.conv.bias': 'patch_embed.proj.bias',
    'cls_token': 'cls_token',
    'pos_embedding': 'pos_embed',
    'head.0.weight': 'norm.weight',
    'head.0.bias': 'norm.bias',
    'head.1.weight': 'head.weight',
    'head.1.bias': 'head.bias',
}
D2L_BLOCK_KEY_MAP = {
    'ln1': 'norm1',
    'ln2': 'norm2',
    'attention.W_o': 'attn.proj',
    'mlp.dense1': 'mlp.fc1',
    'mlp.dense2': 'mlp.fc2',
}


def convert_d2l_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a d2l.ai ViT state dict to smallvit keys; W_q, W_k, W_v stack into one qkv weight.

    d2l key                                  smallvit key
    patch_embedding.conv.{weight,bias}       patch_embed.proj.{weight,bias}
    cls_token, pos_embedding                 cls_token, pos_embed
    blks.i.ln1 / ln2                         blocks.i.norm1 / norm2
    blks.i.attention.W_q / W_k / W_v         blocks.i.attn.qkv (rows: q, then k, then v)
    blks.i.attention.W_o                     blocks.i.attn.proj
    blks.i.mlp.dense1 / dense2               blocks.i.mlp.fc1 / fc2
    head.0 (LayerNorm), head.1 (Linear)      norm, head
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in D2L_KEY_MAP:
            out[D2L_KEY_MAP[key]] = value
            continue
        parts = key.split('.')
        if parts[0] != 'blks' or len(parts) < 4:
            raise KeyError(f'Unexpected key {key!r} in a d2l ViT state dict.')
        block, rest = parts[1], '.'.join(parts[2:])
        if rest in ('attention.W_q.weight', 'attention.W_k.weight', 'attention.W_v.weight'):
            qkv.setdefault(block, {})[rest.split('.')[1]] = value
            continue
        module, _, param = rest.rpartition('.')
        if module not in D2L_BLOCK_KEY_MAP:
            raise KeyError(f'Unexpected key {key!r} in a d2l ViT state dict.')
        out[f'blocks.{block}.{D2L_BLOCK_KEY_MAP[module]}.{param}'] = value
    for block, w in qkv.items():
        out[f'blocks.{block}.attn.qkv.weight'] = torch.cat([w['W_q'], w['W_k'], w['W_v']], dim=0)
    return out


def checkpoint_filter_fn(state_dict: dict[str, Any], model: SmallViT) -> dict[str, torch.Tensor]:
    """Prepare a state dict for ``model``: d2l or timm ViT layouts, resized position / patch embeddings.

    A timm ``VisionTransformer`` always has attention output projection biases; smallvit models built without
    them accept those weights only when the biases are zero, since dropping a non-zero bias would change outputs.
    """
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    if 'pos_embedding' in state_dict:
        state_dict = convert_d2l_state_dict(state_dict)
    # timm's ViT filter reads only what SmallViT shares with VisionTransformer (patch_embed, pos_embed, prefix tokens)
    state_dict = _vit_checkpoint_filter_fn(state_dict, model)

    blocks = model_blocks(model)
    model_has_proj_bias = bool(blocks) and blocks[0].attn.proj.bias is not None
    out = {}
    for key, value in state_dict.items():
        if key.endswith('attn.proj.bias') and not model_has_proj_bias:
            if torch.count_nonzero(value):
                raise ValueError(
                    f'{key} is not zero (max |bias| {value.abs().max().item():.3g}), but this smallvit model has no '
                    f'attention output projection bias. Create it with proj_bias=True to load these weights.'
                )
            continue  # a zero bias is exactly the seed's missing bias
        out[key] = value
    return out


def to_vision_transformer(model: SmallViT) -> VisionTransformer:
    """Build timm's ``VisionTransformer`` with the same shape and weights as ``model`` (same logits in eval)."""
    if isinstance(model.patch_embed, ConvStem):
        raise ValueError("A conv-stem smallvit has no timm VisionTransformer counterpart (its stem isn't a patchify).")
    blocks = model_blocks(model)
    block = blocks[0] if blocks else None
    eps = next(m.eps for m in (model.norm, model.fc_norm) if isinstance(m, nn.LayerNorm))
    vit = VisionTransformer(
        img_size=model.patch_embed.img_size,
        patch_size=model.patch_embed.patch_size,
        in_chans=model.in_chans,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=model.embed_dim,
        depth=len(blocks),
        num_heads=block.attn.num_heads if block is not None else 1,
        mlp_ratio=block.mlp.fc1.weight.shape[0] / model.embed_dim if block is not None else 4.0,
        qkv_bias=block is not None and block.attn.qkv.bias is not None,
        class_token=model.has_class_token,
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        dynamic_img_size=model.dynamic_img_size,
        norm_layer=partial(LayerNorm, eps=eps),
        weight_init='skip',
    )
    state_dict = dict(model.state_dict())
    for name, param in vit.state_dict().items():
        if name.endswith('attn.proj.bias') and name not in state_dict:
            state_dict[name] = torch.zeros_like(param)
    vit.load_state_dict(state_dict)
    return vit.train(model.training)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        'url': '',
        'num_classes': 10,
        'input_size': (1, 28, 28),
        'pool_size': None,
        'crop_pct': 1.0,  # small images: resize to size, no center crop
        'interpolation': 'bilinear',
        'fixed_input_size': True,
        'mean': (0.5,),
        'std': (0.5,),
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Weights trained by the package's own recipes, shipped inside it (timm_smallvit/pretrained/<name>.<tag>/: the
# export of the run, with its card and args.yaml), so `pretrained=True` loads them with no network. top1/top5: the
# single-view accuracy (%) of these weights on the 10,000 Fashion-MNIST test images through timm's eval transform;
# sha256: of model.safetensors, checked before loading, so a damaged file never becomes a model.
PRETRAINED_DIR = Path(__file__).resolve().parent / 'pretrained'
HF_HUB_NAMESPACE = 'timm-smallvit'  # where `smallvit push` publishes them: hf-hub:timm-smallvit/<name>.<tag>
PRETRAINED: dict[str, dict[str, Any]] = {
    'smallvit_tiny_convstem_28.fmnist': dict(
        recipe='fashion_mnist_28',
        top1=93.75,
        top5=99.94,
        sha256='eb99e7d4ad0cc8b43f8e43dcd88c18f6a4baffdda04d90b97180e7e9098a1e2b',
        first_conv='patch_embed.stem.0.conv',
    ),
    'smallvit_nano_patch4_28.fmnist': dict(
        recipe='fashion_mnist_28_patch4',
        top1=90.43,
        top5=99.83,
        sha256='e5ebc7ef81910296e7d27f7a0c228558ddcb012cea9707a41a5ba9fa75b3a2b3',
    ),
}


def _pretrained_file(name: str) -> str:
    return str(PRETRAINED_DIR / name / 'model.safetensors')


def _fmnist_cfg(name: str) -> dict[str, Any]:
    weights = PRETRAINED[name]
    extra = {'first_conv': weights['first_conv']} if 'first_conv' in weights else {}
    return _cfg(
        file=_pretrained_file(name),
        hf_hub_id=f'{HF_HUB_NAMESPACE}/{name}',
        label_names=FASHION_MNIST_CLASSES,
        description=f'Trained on Fashion-MNIST (60,000 images) with the {weights["recipe"]} recipe.',
        origin_url='https://github.com/zalandoresearch/fashion-mnist',
        notes=(
            f'Fashion-MNIST test top-1 {weights["top1"]:.2f}%, top-5 {weights["top5"]:.2f}% '
            '(10,000 images, single view)',
            'Data: Fashion-MNIST, Zalando Research, MIT licence',
            f'Recipe: smallvit train --config {weights["recipe"]}',
        ),
        **extra,
    )


default_cfgs = generate_default_cfgs(
    {
        'smallvit': _cfg(
            input_size=(1, 96, 96),
            description='ViT of d2l.ai chapter 11.8 (Vision Transformers): 96 px grayscale, patch 16.',
            origin_url='https://d2l.ai/chapter_attention-mechanisms-and-transformers/vision-transformer.html',
        ),
        'smallvit_nano_patch4_28.fmnist': _fmnist_cfg('smallvit_nano_patch4_28.fmnist'),
        'smallvit_nano_patch4_28': _cfg(),
        'smallvit_tiny_patch4_28': _cfg(),
        'smallvit_small_patch4_28': _cfg(),
        'smallvit_medium_patch4_28': _cfg(),
        'smallvit_tiny_patch4_32': _cfg(input_size=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD),
        'smallvit_small_patch4_32': _cfg(input_size=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD),
        'smallvit_tiny_patch8_64': _cfg(input_size=(1, 64, 64)),
        'smallvit_tiny_patch8_96': _cfg(input_size=(1, 96, 96)),
        'smallvit_tiny_convstem_28.fmnist': _fmnist_cfg('smallvit_tiny_convstem_28.fmnist'),
        'smallvit_tiny_convstem_28': _cfg(first_conv='patch_embed.stem.0.conv'),
        'smallvit_medium_convstem_28': _cfg(first_conv='patch_embed.stem.0.conv'),
    }
)


def _check_pretrained(variant: str, kwargs: dict[str, Any]) -> None:
    """Before timm loads shipped weights: a clear error for an unknown tag, and a checksum of the packaged file."""
    try:
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    except RuntimeError as e:  # timm's "Invalid pretrained tag (x) for y." names no valid tag
        tags = list_pretrained(f'{variant}.*') or ['none']
        raise RuntimeError(f'{e} Pretrained tags of {variant}: {", ".join(tags)}.') from None
    name = f'{variant}.{cfg.tag}' if cfg.tag else variant
    shipped = name in PRETRAINED and cfg.file == _pretrained_file(name)
    if not shipped or cfg.file is None or cfg.state_dict is not None or cfg.source in ('hf-hub', 'local-dir'):
        return  # timm loads something else (a state dict, the Hub, a file of the user's): its own checks apply
    path = Path(cfg.file)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: the packaged {name} weights are missing. Reinstall timm-smallvit.')
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != PRETRAINED[name]['sha256']:
        raise ValueError(
            f'{path}: the packaged {name} weights are damaged (SHA-256 {digest[:12]}..., expected '
            f'{PRETRAINED[name]["sha256"][:12]}...). Reinstall timm-smallvit.'
        )


def _create_smallvit(variant: str, pretrained: bool = False, **kwargs: Any) -> SmallViT:
    depth = kwargs.get('depth', 2)
    out_indices = kwargs.pop('out_indices', min(3, depth))
    if pretrained:
        _check_pretrained(variant, kwargs)
    return build_model_with_cfg(
        SmallViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


@register_model
def smallvit(pretrained: bool = False, **kwargs: Any) -> SmallViT:
    """The reference ViT of d2l.ai 11.8: 96 px, patch 16, width 512, MLP 2048, 8 heads, 2 blocks, dropout 0.1."""
    model_args = dict(
        img_size=96,
        patch_size=16,
        embed_dim=512,
        depth=2,
        num_heads=8,
        mlp_ratio=4.0,
        pos_drop_rate=0.1,
        proj_drop_rate=0.1,
        attn_drop_rate=0.1,
    )
    return _create_smallvit('smallvit', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def smallvit_nano_patch4_28(pretrained: bool = False, **kwargs: Any) -> SmallViT:
    """28 px, patch 4 (49 patches), width 64, depth 6, 2 heads: about 0.3M parameters."""
    model_args = dict(img_size=28, patch_size=4, embed_dim=64, depth=6, num_heads=2)
    return _create_smallvit('smallvit_nano_patch4_28', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def smallvit_tiny_patch4_28(pretrained: bool = False, **kwargs: Any) -> SmallViT:
    """28 px, patch 4, width 128, depth 6, 4 heads: about 1.2M parameters."""
    model_args = dict(img_size=28, patch_size=4, embed_dim=128, depth=6, num_heads=4)
    return _create_smallvit('smallvit_tiny_patch4_28', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def smallvit_small_patch4_28(pretrained: bool = False, **kwargs: Any) -> SmallViT:
    """28 px, patch 4, width 192, depth 6, 3 heads: about 2.7M parameters."""
    model_args = dict(img_size=28, patch_size=4, embed_dim=192, depth=6, num_heads=3)
    return _create_smallvit('smallvit_small_patch4_28', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def smallvit_medium_patch4_28(pretrained: bool = False, **kwargs: Any) -> SmallViT:
    """28 px, patch 4, width 256, depth 8, 8 heads: about 6.3M parameters."""
    model_args = dict(img_size=28, patch_size=4, embed_dim=256, depth=8, num_heads=8)
    return _create_smallvit('smallvit_medium_patch4_28', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def smallvit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> SmallViT:
    """32 px RGB (CIFAR), patch 4 (64 patches), width 128, depth 6, 4 heads."""
    model_args = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=128, depth=6, num_heads=4)
    return _create_smallvit('smallvit_tiny_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def smallvit_small_patch4_32(pretrained: bool = False, **kwargs: Any) -> SmallViT:
    """32 px RGB (CIFAR), patch 4, width 192, depth 6, 3 heads."""
    model_args = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=6, num_heads=3)
    return _create_smallvit('smallvit_small_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def smallvit_tiny_patch8_64(pretrained: bool = False, **kwargs: Any) -> SmallViT:
    """64 px, patch 8 (64 patches), width 128, depth 6, 4 heads."""
    model_args = dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4)
    return _create_smallvit('smallvit_tiny_patch8_64', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def smallvit_tiny_patch8_96(pretrained: bool = False, **kwargs: Any) -> SmallViT:
    """96 px, patch 8 (144 patches), width 128, depth 6, 4 heads."""
    model_args = dict(img_size=96, patch_size=8, embed_dim=128, depth=6, num_heads=4)
    return _create_smallvit('smallvit_tiny_patch8_96', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def smallvit_tiny_convstem_28(pretrained: bool = False, **kwargs: Any) -> SmallViT:
    """28 px, conv stem 16-32-32-64 (strides 1, 2, 1, 2, then 2: a 4x4 grid), width 96, depth 4, mean-pooled.

    The quickest learner here (the demo model): 0.54M parameters, 16 tokens, no class token.
    """
    model_args = dict(
        img_size=28,
        patch_size=8,
        stem_chs=(16, 32, 32, 64),
        stem_strides=(1, 2, 1, 2),
        embed_dim=96,
        depth=4,
        num_heads=4,
        class_token=False,
    )
    return _create_smallvit('smallvit_tiny_convstem_28', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def smallvit_medium_convstem_28(pretrained: bool = False, **kwargs: Any) -> SmallViT:
    """28 px, conv stem 32-64-128 (strides 1, 1, 2, then 2: a 7x7 grid), width 256, depth 6, 8 heads, mean-pooled.

    The GPU recipe's model (fashion_mnist_gpu): 5.1M parameters, 49 tokens, no class token.
    """
    model_args = dict(
        img_size=28,
        patch_size=4,
        stem_chs=(32, 64, 128),
        stem_strides=(1, 1, 2),
        embed_dim=256,
        depth=6,
        num_heads=8,
        class_token=False,
    )
    return _create_smallvit('smallvit_medium_convstem_28', pretrained=pretrained, **dict(model_args, **kwargs))
