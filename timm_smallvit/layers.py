"""The plug-in parts smallvit is built from, each a drop-in for timm's ViT part of the same name.

    PatchEmbed    timm's, checking its input first (:func:`check_input`)
    ConvStem      a few 3x3 conv-BN-GELU layers instead of the patchify conv (Xiao et al., 2021)
    Dropout       ``nn.Dropout`` drawing a quarter of the random numbers on the CPU (:func:`dropout`)
    Attention     timm's, without output bias; the explicit softmax path for bf16 on the CPU (:func:`attend`)
    Mlp           timm's, with biases on both linear layers
    Block         timm's pre-norm ViT block with these parts, and ``forward_prefix`` for a trimmed last block

The functions that branch on real tensors (:func:`check_input`, :func:`dropout`, :func:`attend`) are fx leaves for
timm's and torchvision's tracers alike (``torch.fx.wrap`` and timm's ``register_notrace_function``), so feature
extraction traces every variant, dropout or not.
"""

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.layers import ConvNormAct, LayerNorm, register_notrace_function, to_2tuple
from timm.layers import Mlp as TimmMlp
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Block as TimmBlock

__all__ = [
    'POOL_ALIASES',
    'POOL_TYPES',
    'Attention',
    'Block',
    'ConvStem',
    'Dropout',
    'Mlp',
    'PatchEmbed',
    'PoolType',
    'attend',
    'check_input',
    'dropout',
    'resolve_global_pool',
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


@torch.fx.wrap  # a leaf for any fx tracer: the channel test runs on real shapes, not proxies
@register_notrace_function
def luma_if_rgb(x: torch.Tensor) -> torch.Tensor:
    """A 3-channel batch becomes 1-channel luma; anything else passes unchanged.

    ITU-R 601-2 luma, as PIL's ``Image.convert('L')``, which smallvit predict applies to RGB files for grayscale
    models. The weights sum to 1, so a per-image normalization with one mean and std for every channel commutes with it.
    """
    if x.dim() == 4 and x.shape[1] == 3:
        x = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # literals: TorchScript reads no globals
    return x


def gray_from_rgb_hook(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
    """A forward pre-hook for a grayscale model's patch embedding: :func:`luma_if_rgb` on its input."""
    return (luma_if_rgb(args[0]),)


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


# a leaf for any fx tracer (timm's and torchvision's): its device branch and mask run on real tensors, not proxies
@torch.fx.wrap
@register_notrace_function
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
