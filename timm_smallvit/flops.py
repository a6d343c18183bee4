"""Training compute, counted: the FLOPs of one image's training step, so a run's compute is known on any machine.

    count_flops                matmul, convolution and attention FLOPs of one image through a model (forward, or
                               forward and backward), with torch's FlopCounterMode
    training_flops_per_image   one image's whole training step: the model's forward and backward plus the forward of
                               every other model that runs in it (a distillation teacher)

Wall time depends on the machine and moves by 1.5x within an hour on a VM; FLOPs per image times images trained on
does not, so accuracy targets and ``budget_tflop`` are set in it. Elementwise work (norms, activations, softmax
outside attention, the optimizer and the EMA update) is not counted, as usual for FLOP counts.
"""

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ['CPU_SDPA_FLOPS', 'count_flops', 'training_flops_per_image']


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one: without these, fused attention counts as 0
CPU_SDPA_FLOPS: dict[Any, Any] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(model: nn.Module, in_shape: tuple[int, ...], num_classes: int, kind: str) -> int:
    """Matmul, conv and attention FLOPs of one image (fp32 eager; autocast and compile do the same math).

    Counted at batch 2, halved (batch norm in training mode needs two values where a CNN's last stage is 1x1), on
    the model as given (its train/eval mode is set, and a training count leaves gradients cleared): every op of
    these models is linear in the batch, so a batch costs batch x this.

    Args:
        model: Any image model.
        in_shape: One image's (C, H, W).
        num_classes: Classes of the cross-entropy target (``kind='train'``).
        kind: 'train' (forward and backward of the cross-entropy loss) or 'infer' (forward in eval mode).
    """
    if kind not in ('train', 'infer'):
        raise ValueError(f"kind {kind!r}: 'train' or 'infer'.")
    device = next(model.parameters()).device
    x = torch.randn(2, *in_shape, device=device)
    y = torch.randint(0, num_classes, (2,), device=device)
    model.train(kind == 'train')

    # FlopCounterMode tracks modules with global hooks, and a smallvit then runs its full last block (as it does for
    # any hook, see SmallViT.forward): count the forward that runs unobserved
    def forward(x: torch.Tensor) -> torch.Tensor:
        trims = getattr(model, 'trims_last_block', None)
        if callable(trims) and trims():
            return model.forward_head(model.forward_class_token(x))  # type: ignore[operator]
        return model(x)

    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        if kind == 'train':
            F.cross_entropy(forward(x), y).backward()
        else:
            with torch.no_grad():
                forward(x)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() // 2


def training_flops_per_image(
    model: nn.Module,
    in_shape: tuple[int, ...],
    num_classes: int,
    teacher: nn.Module | None = None,
) -> int:
    """FLOPs of one image's training step: the model's forward and backward, and a teacher's forward if there is one.

    Counted on copies, so the models' gradients and batch-norm statistics stay as they are.

    Args:
        model: The model being trained.
        in_shape: One training image's (C, H, W), as the step sees it.
        num_classes: The model's classes.
        teacher: A model whose logits the step also computes (distillation), without gradients.
    """
    flops = count_flops(copy.deepcopy(model), in_shape, num_classes, 'train')
    if teacher is not None:
        flops += count_flops(copy.deepcopy(teacher), in_shape, num_classes, 'infer')
    return flops
