"""Small Vision Transformers, registered in timm as the ``smallvit*`` family.

``smallvit`` is the Vision Transformer of the "Vision Transformers" chapter of Dive into Deep Learning
(d2l.ai, section 11.8), built as timm's ``VisionTransformer`` from the parts in :mod:`timm_smallvit.layers`. An
image goes through:

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
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from timm.layers import LayerNorm
from timm.models import (
    build_model_with_cfg,
    checkpoint,
    generate_default_cfgs,
    list_pretrained,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_checkpoint_filter_fn
from torch.jit import Final
from torchvision.datasets import FashionMNIST

from .layers import (
    Attention,
    Block,
    ConvStem,
    Dropout,
    Mlp,
    PatchEmbed,
    gray_from_rgb_hook,
    resolve_global_pool,
)

__all__ = [
    'SmallViT',
    'checkpoint_filter_fn',
    'convert_d2l_state_dict',
    'explicit_attention',
    'model_blocks',
    'to_vision_transformer',
]


class SmallViT(VisionTransformer):
    """Vision Transformer for small images, the seed model of d2l.ai's chapter 11.8, as a timm ``VisionTransformer``.

    timm's ViT code throughout, built from the parts in :mod:`timm_smallvit.layers` (``PatchEmbed`` or ``ConvStem``,
    ``Block``, ``Attention``, ``Mlp``, ``Dropout``). Overridden: ``forward``, which computes the
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
        gray_from_rgb: bool = False,
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
        if gray_from_rgb:
            if in_chans != 1:
                raise ValueError(f'gray_from_rgb converts RGB for a grayscale model: in_chans is {in_chans}, not 1.')
            # before the patch embedding's own input check (prepend): for callers that hand over every image as RGB
            self.patch_embed.register_forward_pre_hook(gray_from_rgb_hook, prepend=True)
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
    'smallvit_tiny_convstem_28.fmnist_600tflop': dict(
        recipe='fashion_mnist_28_600tflop',
        top1=94.78,
        top5=99.04,
        sha256='217d6a9c6291791daa8713c3666d8c47e6d60fccf43164e253c6a696bf452dc5',
        first_conv='patch_embed.stem.0.conv',
    ),
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
        label_names=tuple(FashionMNIST.classes),  # torchvision's names, in label order
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
        # timm's default tag is the first one listed: the most accurate weights
        'smallvit_tiny_convstem_28.fmnist_600tflop': _fmnist_cfg('smallvit_tiny_convstem_28.fmnist_600tflop'),
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
