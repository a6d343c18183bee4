"""What a smallvit model attends to, at its patch grid.

attention_rollout   attention rollout across blocks (Abnar and Zuidema, 2020): prod_l (0.5 A_l + 0.5 I)
attention_maps      the last block's attention and the rollout, each at the patch grid, from timm's
                    ``AttentionExtract``
PooledAttention     the same maps for many batches of one model, with its extractor built once
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.utils.attention_extract import AttentionExtract

from .smallvit import SmallViT, explicit_attention

__all__ = ['PooledAttention', 'attention_maps', 'attention_rollout']


def attention_rollout(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema, 2020) over blocks: prod_l (0.5 A_l + 0.5 I), heads averaged.

    Args:
        maps: Each block's attention, (B, heads, N, N), first block first.

    Returns:
        (B, N, N): how much each output token draws on each input token through every block and residual.
    """
    rollout = None
    for attn in maps:
        a = attn.float().mean(dim=1)  # (B, N, N)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    if rollout is None:
        raise ValueError('attention_rollout needs at least one attention map.')
    return rollout


def attention_maps(model: SmallViT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the pooled feature attends to, at the patch grid: (last block, rollout), each (B, grid_h, grid_w).

    Class-token models: the class token's row (its attention over the patches); mean-pooled models: the mean of the
    patch tokens' rows. Maps come from timm's ``AttentionExtract`` on the explicit attention path (the model's own
    attention setting is restored afterwards).
    """
    # AttentionExtract reads the explicit path's softmax, as for timm's ViT
    with explicit_attention(model):
        return PooledAttention(model)(x)


class PooledAttention:
    """``attention_maps`` for many batches of one model: (last block, rollout), each (B, grid_h, grid_w).

    The model must be on the explicit attention path (``smallvit.explicit_attention``, or ``set_fused_attn(False)``)
    while this is called.

    Args:
        model: The model whose attention is read.
    """

    def __init__(self, model: SmallViT) -> None:
        self.extract = AttentionExtract(model, method='fx')
        self.prefix = model.num_prefix_tokens
        self.pooled_by_token = model.global_pool == 'token'
        self.grid = tuple(model.patch_embed.grid_size)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            maps = list(self.extract(x).values())  # each (B, heads, N, N)
        rollout = attention_rollout(maps)
        last = maps[-1].float().mean(dim=1)
        return self._pooled(last), self._pooled(rollout)

    def _pooled(self, attn: torch.Tensor) -> torch.Tensor:
        p = self.prefix
        rows = attn[:, 0, p:] if self.pooled_by_token else attn[:, p:, p:].mean(dim=1)  # (B, patches)
        return rows.reshape(-1, *self.grid)
