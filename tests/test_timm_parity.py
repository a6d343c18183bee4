"""smallvit answers hooks, feature extractors and AttentionExtract as timm's VisionTransformer of the same weights.

The oracle is timm's own ViT (``to_vision_transformer``: same weights, timm's code) run with the same probes. The
speed path (the last block computed for the class token alone) must never show: a test of the test checks that a
forward which always trims fails the hook comparison.
"""

import copy

import pytest
import timm
import torch
from timm.layers import PatchEmbed
from timm.models._features_fx import create_feature_extractor as timm_feature_extractor
from timm.utils.attention_extract import AttentionExtract
from torchvision.models.feature_extraction import create_feature_extractor as tv_feature_extractor

from timm_smallvit import to_vision_transformer
from timm_smallvit.layers import ConvStem
from timm_smallvit.smallvit import SmallViT

from .test_model_oracles import _randomize_

NO_DROPOUT = dict(pos_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0)
# every registered variant, with its default arguments (the textbook smallvit's dropout 0.1 included): class-token
# models, where forward may trim the last block, and mean-pooled conv-stem ones
MODELS = timm.list_models('smallvit*')


def _timm_vit(ours: SmallViT):
    """timm's ViT of the same weights; around a copy of the stem for a conv stem, which has no timm counterpart."""
    if not isinstance(ours.patch_embed, ConvStem):
        return to_vision_transformer(ours)
    stem = ours.patch_embed
    patchify = copy.deepcopy(ours)
    patch = tuple(size // grid for size, grid in zip(stem.img_size, stem.grid_size, strict=True))  # same token grid
    patchify.patch_embed = PatchEmbed(stem.img_size, patch, ours.in_chans, ours.embed_dim)
    vit = to_vision_transformer(patchify)
    vit.patch_embed = copy.deepcopy(stem)  # the tokens, blocks, norms and head stay timm's code
    return vit


def _pair(name: str, fused: bool = True, train: bool = False):
    # in training, random dropout masks differ from timm's: there the oracle needs the variant without dropout
    ours = _randomize_(timm.create_model(name, **(NO_DROPOUT if train else {})))
    ours.set_fused_attn(fused)
    vit = _timm_vit(ours)
    for blk in vit.blocks:
        blk.attn.fused_attn = fused
    ours.train(train)
    vit.train(train)
    chans, (h, w) = ours.in_chans, ours.patch_embed.img_size
    x = torch.randn(2, chans, h, w, generator=torch.Generator().manual_seed(0))
    return ours, vit, x


def _recorded(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, list[tuple]]:
    """Each named module's inputs and outputs during model(x), from forward hooks."""
    seen: dict[str, list[tuple]] = {name: [] for name in names}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(m, args, out, name=name):
            seen[name].append(([a.detach().clone() for a in args if torch.is_tensor(a)], out.detach().clone()))

        handles.append(module.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _hooked_names(model: SmallViT) -> list[str]:
    return ['blocks', 'norm'] + [n for n, _ in model.named_modules() if n.startswith('blocks.')]


def _assert_hooks_see_what_timm_sees(ours, vit, x) -> None:
    names = _hooked_names(ours)
    got, expected = _recorded(ours, x, names), _recorded(vit, x, names)
    for name in names:
        assert len(got[name]) == len(expected[name]), f'{name}: called {len(got[name])}x, timm {len(expected[name])}x'
        for (ins, out), (ins_vit, out_vit) in zip(got[name], expected[name], strict=True):
            assert out.shape == out_vit.shape, f'{name}: output {tuple(out.shape)}, timm {tuple(out_vit.shape)}'
            torch.testing.assert_close(out, out_vit, atol=1e-4, rtol=1e-4, msg=name)
            for a, b in zip(ins, ins_vit, strict=True):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'explicit'])
@pytest.mark.parametrize('name', MODELS)
def test_hooks_on_every_block_and_submodule_see_timms_inputs_and_outputs(name, fused, train):
    ours, vit, x = _pair(name, fused, train)
    _assert_hooks_see_what_timm_sees(ours, vit, x)


def test_the_hook_test_fails_a_forward_that_trims_while_observed(monkeypatch):
    ours, vit, x = _pair('smallvit_nano_patch4_28')
    monkeypatch.setattr(SmallViT, '_unobserved', lambda self, x: True)
    with pytest.raises(AssertionError, match='blocks'):
        _assert_hooks_see_what_timm_sees(ours, vit, x)


@pytest.mark.parametrize('extractor', [timm_feature_extractor, tv_feature_extractor], ids=['timm_fx', 'torchvision'])
@pytest.mark.parametrize('name', MODELS)
def test_fx_feature_extractors_return_every_token_of_every_block(name, extractor):
    ours = _randomize_(timm.create_model(name)).eval()  # torchvision's extractor traces the training graph too
    chans, (h, w) = ours.in_chans, ours.patch_embed.img_size
    x = torch.randn(2, chans, h, w)
    nodes = [f'blocks.{i}' for i in range(len(ours.blocks))]
    prefix = ours.num_prefix_tokens
    with torch.no_grad():
        features = extractor(ours, return_nodes=nodes)(x)
        expected = ours.forward_intermediates(
            x, output_fmt='NLC', return_prefix_tokens=bool(prefix), intermediates_only=True
        )
    assert list(features) == nodes
    for node, inter in zip(nodes, expected, strict=True):
        tokens = torch.cat([inter[1], inter[0]], dim=1) if prefix else inter  # (B, prefix + patches, D)
        assert features[node].shape == tokens.shape == (2, prefix + ours.patch_embed.num_patches, ours.embed_dim)
        torch.testing.assert_close(features[node], tokens)


def _attention_by_hand(vit, x: torch.Tensor) -> list[torch.Tensor]:
    """softmax(q k^T / sqrt(d)) of every block, from timm's ViT's own modules, step by step."""
    maps = []
    with torch.no_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for blk in vit.blocks:
            attn = blk.attn
            B, N, _ = tokens.shape
            qkv = attn.qkv(blk.norm1(tokens)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, _ = qkv.unbind(0)
            maps.append(((q @ k.transpose(-2, -1)) * attn.head_dim**-0.5).softmax(dim=-1))
            tokens = blk(tokens)
    return maps


@pytest.mark.parametrize('method', ['fx', 'hook'])
@pytest.mark.parametrize('name', MODELS)
def test_attention_extract_returns_every_blocks_map(name, method):
    ours, vit, x = _pair(name, fused=False)
    with torch.no_grad():
        maps = AttentionExtract(ours, method=method)(x)
    expected = _attention_by_hand(vit, x)
    assert len(maps) == len(ours.blocks) == len(expected)
    heads, tokens = ours.blocks[0].attn.num_heads, ours.num_prefix_tokens + ours.patch_embed.num_patches
    for (key, attn), by_hand in zip(maps.items(), expected, strict=True):
        assert attn.shape == (2, heads, tokens, tokens), key
        torch.testing.assert_close(attn, by_hand, atol=1e-5, rtol=1e-4, msg=key)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, heads, tokens))


def test_forward_still_trims_when_nothing_observes_it():
    ours, vit, x = _pair('smallvit_nano_patch4_28')
    assert ours._unobserved(x)
    handle = ours.blocks[-1].mlp.register_forward_hook(lambda *a: None)
    assert not ours._unobserved(x)
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), vit(x), atol=1e-4, rtol=1e-4)
