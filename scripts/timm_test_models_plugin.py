"""pytest plugin that runs timm's own tests/test_models.py on the smallvit family (``scripts/timm_test_models.sh``).

It registers the family (``import timm_smallvit``), runs it wherever timm runs its own ViTs (the tests that select
the ``vision_transformer`` module or the ``vit_*`` names, and not those that exclude them), and registers
``depth2_vit_oracle``: timm's own ``VisionTransformer`` at the textbook model's depth of 2.

timm's forward_intermediates test asks for at least 3 feature levels; a 2-block ViT has 2, so ``smallvit`` and the
oracle are expected to fail it the same way (strict xfail: the run fails if either passes). timm's own depth-2 ViT
also fails forward_intermediates_features (its default out_indices=3 is out of range), which smallvit passes
(its out_indices default to min(3, depth)).
"""

import timm
import timm.models._registry as registry
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import _create_vision_transformer

import timm_smallvit  # noqa: F401  (registers smallvit*)

_list_models = registry.list_models


def _with(patterns, extra):
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
    return [*patterns, *extra] if patterns else patterns


def _list_models_with_smallvit(filter='', module='', *args, exclude_filters='', **kwargs):
    # smallvit is tested wherever timm tests its own ViTs: the vision_transformer module, the vit_* name filters
    modules = [module] if isinstance(module, str) else list(module)
    if 'vision_transformer' in modules:
        module = [*modules, 'smallvit', 'timm_test_models_plugin']
    filters = [filter] if isinstance(filter, str) else list(filter)
    if 'vit_*' in filters:
        filter = _with(filter, ['smallvit*', 'depth2_vit_oracle'])
    excluded = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    if 'vit_*' in excluded:
        exclude_filters = _with(exclude_filters, ['smallvit*', 'depth2_vit_oracle'])
    return _list_models(filter, module, *args, exclude_filters=exclude_filters, **kwargs)


timm.list_models = registry.list_models = _list_models_with_smallvit


# register_model takes the cfg from this module's default_cfgs, as for timm's own model files
default_cfgs = generate_default_cfgs(
    {
        'depth2_vit_oracle': dict(
            input_size=(1, 96, 96),
            num_classes=10,
            mean=(0.5,),
            std=(0.5,),
            crop_pct=1.0,
            first_conv='patch_embed.proj',
            classifier='head',
        )
    }
)


@register_model
def depth2_vit_oracle(pretrained: bool = False, **kwargs):
    """timm's VisionTransformer at the textbook shape (96 px grayscale, patch 16, width 512, 8 heads, 2 blocks)."""
    args = dict(img_size=96, in_chans=1, num_classes=10, patch_size=16, embed_dim=512, depth=2, num_heads=8)
    return _create_vision_transformer('depth2_vit_oracle', pretrained=pretrained, **dict(args, **kwargs))


# (model, test) pairs that fail for the depth of 2 alone
_DEPTH_TWO = {
    ('smallvit', 'test_model_forward_intermediates'),
    ('depth2_vit_oracle', 'test_model_forward_intermediates'),
    ('depth2_vit_oracle', 'test_model_forward_intermediates_features'),
}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        params = getattr(item, 'callspec', None)
        name = params.params.get('model_name') if params else None
        if (name, item.originalname) in _DEPTH_TWO:
            item.add_marker(
                pytest.mark.xfail(
                    strict=True,
                    raises=AssertionError,
                    reason='2 blocks give 2 feature levels; timm asks for 3',
                )
            )
