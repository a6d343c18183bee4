"""smallvit against external oracles: timm's own VisionTransformer and the textbook model (d2l.ai 11.8)."""

from functools import partial

import pytest
import timm
import torch
from timm.layers import LayerNorm, resample_abs_pos_embed
from timm.models._manipulate import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer

from timm_smallvit import SmallViT, convert_d2l_state_dict, to_vision_transformer
from timm_smallvit._reference_d2l import ViT as D2LViT
from timm_smallvit.layers import Block

ATOL = 1e-5


def _randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values everywhere (norm scales, biases, tokens), so a swapped or dropped tensor shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return module


def _seed_vit(global_pool: str) -> VisionTransformer:
    """timm's VisionTransformer configured to the seed's shape."""
    return VisionTransformer(
        img_size=96,
        patch_size=16,
        in_chans=1,
        num_classes=10,
        global_pool=global_pool,
        embed_dim=512,
        depth=2,
        num_heads=8,
        mlp_ratio=4.0,
        qkv_bias=False,
        norm_layer=partial(LayerNorm, eps=1e-5),
    )


def test_smallvit_parameter_count():
    model = timm.create_model('smallvit')
    assert sum(p.numel() for p in model.parameters()) == 6_457_866


def test_smallvit_matches_the_chapter_shape():
    model = timm.create_model('smallvit')
    assert model.patch_embed.proj.kernel_size == (16, 16) and model.patch_embed.proj.bias is not None
    assert model.patch_embed.num_patches == 36 and model.pos_embed.shape == (1, 37, 512)
    assert len(model.blocks) == 2 and model.num_classes == 10 and model.global_pool == 'token'
    block = model.blocks[0]
    assert block.attn.num_heads == 8 and block.attn.qkv.bias is None and block.attn.proj.bias is None
    assert block.mlp.fc1.out_features == 2048 and block.mlp.fc1.bias is not None and block.mlp.fc2.bias is not None
    assert block.norm1.eps == 1e-5 and model.norm.eps == 1e-5
    assert block.attn.attn_drop.p == 0.1 and block.mlp.drop1.p == 0.1 and block.mlp.drop2.p == 0.1
    assert model.pos_drop.p == 0.1 and block.attn.proj_drop.p == 0.0  # the chapter has no dropout after W_o


@pytest.mark.parametrize('global_pool', ['token', 'avg'])
def test_equivalent_to_timm_vit_both_ways(global_pool):
    x = torch.randn(4, 1, 96, 96)

    # timm -> smallvit, through create_model's pretrained path (the filter drops the zero proj biases)
    vit = _randomize_(_seed_vit(global_pool)).eval()
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.proj.bias.zero_()
    ours = timm.create_model(
        'smallvit', pretrained=True, global_pool=global_pool, pretrained_cfg_overlay=dict(state_dict=vit.state_dict())
    ).eval()
    with torch.no_grad():
        assert (ours(x) - vit(x)).abs().max() <= ATOL

    # smallvit -> timm
    ours = _randomize_(timm.create_model('smallvit', global_pool=global_pool)).eval()
    vit = _seed_vit(global_pool).eval()
    state_dict = ours.state_dict()
    missing = vit.load_state_dict(state_dict, strict=False).missing_keys
    assert sorted(missing) == [f'blocks.{i}.attn.proj.bias' for i in range(2)]  # the only difference
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.proj.bias.zero_()
        assert (ours(x) - vit(x)).abs().max() <= ATOL
        # and the package's own converter gives the same model
        assert (ours(x) - to_vision_transformer(ours).eval()(x)).abs().max() <= ATOL


def test_nonzero_timm_proj_bias_is_refused():
    vit = _randomize_(_seed_vit('token'))
    with pytest.raises(ValueError, match=r'blocks\.0\.attn\.proj\.bias is not zero.*proj_bias=True'):
        timm.create_model('smallvit', pretrained=True, pretrained_cfg_overlay=dict(state_dict=vit.state_dict()))
    # with proj_bias=True the bias has a home and loads exactly
    ours = timm.create_model(
        'smallvit', pretrained=True, proj_bias=True, pretrained_cfg_overlay=dict(state_dict=vit.state_dict())
    ).eval()
    x = torch.randn(2, 1, 96, 96)
    with torch.no_grad():
        assert (ours(x) - vit.eval()(x)).abs().max() <= ATOL


@pytest.mark.parametrize('fused', [True, False])
def test_equivalent_to_the_textbook_model(fused):
    reference = _randomize_(D2LViT()).eval()
    state_dict = convert_d2l_state_dict(reference.state_dict())
    ours = timm.create_model('smallvit', fused_attn=fused).eval()
    ours.load_state_dict(state_dict)  # strict: every tensor has exactly one home
    x = torch.randn(4, 1, 96, 96)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() <= ATOL
    # the textbook layout is also recognised by create_model's pretrained loader
    loaded = timm.create_model(
        'smallvit', pretrained=True, pretrained_cfg_overlay=dict(state_dict=reference.state_dict())
    ).eval()
    with torch.no_grad():
        assert (loaded(x) - reference(x)).abs().max() <= ATOL


def test_fused_and_explicit_attention_agree():
    model = _randomize_(timm.create_model('smallvit_small_patch4_28')).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        model.set_fused_attn(True)
        fused = model(x)
        model.set_fused_attn(False)
        explicit = model(x)
    assert all(not b.attn.fused_attn for b in model.blocks)
    assert (fused - explicit).abs().max() <= ATOL


def test_bf16_on_cpu_takes_the_explicit_attention_and_matches_timm_vit(monkeypatch):
    """Under bf16 autocast on the CPU smallvit skips PyTorch's fused kernel (slow there) and still computes what
    timm's ViT computes with it; in float32 it keeps the fused kernel."""
    import timm_smallvit.layers as smallvit_module

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].dtype)
        return sdpa(*args, **kwargs)

    model = timm.create_model('smallvit_small_patch4_28')  # timm's ViT init: logits of a trained-like scale
    vit = to_vision_transformer(model).eval()
    model.eval()
    monkeypatch.setattr(smallvit_module.F, 'scaled_dot_product_attention', counting_sdpa)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        ours = model(x)
    assert ours.dtype == torch.bfloat16 and calls == []
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        theirs = vit(x)  # timm's Attention: the fused kernel (the patch is on torch.nn.functional, so it counts)
    assert calls and set(calls) == {torch.bfloat16}
    calls.clear()
    torch.testing.assert_close(ours.float(), theirs.float(), atol=0.05, rtol=0.05)
    # trains in bf16: gradients reach every parameter through the explicit path
    model.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(x).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    assert calls == []
    with torch.no_grad():
        model.eval()(x)
    assert calls and set(calls) == {torch.float32}


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_dropout_matches_torch_dropout_in_distribution(dtype):
    """smallvit's cheaper CPU dropout: the rate, the 1/(1-p) scale and the gradient of torch's, reproducible."""
    from timm_smallvit.layers import Dropout, dropout

    x = torch.rand(512, 1000, dtype=dtype) + 0.5  # no zeros, so every zero in the output was dropped
    x.requires_grad_(True)
    for p in (0.1, 0.5):
        torch.manual_seed(0)
        y = dropout(x, p)
        dropped = (y == 0).float().mean().item()
        reference = (torch.nn.functional.dropout(x, p) == 0).float().mean().item()
        assert abs(dropped - p) < 0.005 and abs(dropped - reference) < 0.01
        kept = y != 0
        scale = torch.tensor(1 / (1 - p), dtype=dtype)  # the scale as the dtype holds it
        torch.testing.assert_close(y[kept], x[kept] * scale)
        (grad,) = torch.autograd.grad(y.float().sum(), x)
        torch.testing.assert_close(grad.float(), kept.float() * scale.float())
        torch.manual_seed(0)
        assert torch.equal(dropout(x, p), y)  # the global seed fixes the mask, as with torch's dropout
    module = Dropout(0.1)
    assert isinstance(module, torch.nn.Dropout) and module.p == 0.1
    assert module.eval()(x) is x and dropout(x, 0.0) is x
    assert dropout(x, 1.0).eq(0).all()


def test_pretrained_weights_resample_to_another_image_size():
    source = _randomize_(timm.create_model('smallvit_tiny_patch4_28'))
    target = timm.create_model(
        'smallvit_tiny_patch4_28',
        pretrained=True,
        img_size=32,
        pretrained_cfg_overlay=dict(state_dict=source.state_dict()),
    )
    assert target.pos_embed.shape == (1, 1 + 8 * 8, 128)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(8, 8), old_size=(7, 7), num_prefix_tokens=1)
    torch.testing.assert_close(target.pos_embed.detach(), expected)
    torch.testing.assert_close(target.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    assert target(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_set_input_size_and_dynamic_img_size():
    model = _randomize_(timm.create_model('smallvit_tiny_patch4_28')).eval()
    dynamic = timm.create_model('smallvit_tiny_patch4_28', dynamic_img_size=True).eval()
    dynamic.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert (dynamic(x) - model(x)).abs().max() <= ATOL  # native size: nothing resampled
        y = torch.randn(2, 1, 40, 36)
        out_dynamic = dynamic(y)
        model.set_input_size((40, 36))
        assert model.patch_embed.grid_size == (10, 9) and model.pos_embed.shape[1] == 1 + 90
        assert (model(y) - out_dynamic).abs().max() <= ATOL


@pytest.mark.parametrize(
    ('variant', 'source_chans', 'target_chans'),
    [('smallvit_tiny_patch4_28', 1, 3), ('smallvit_tiny_patch4_32', 3, 1)],
)
def test_pretrained_patch_weights_adapt_channels(variant, source_chans, target_chans):
    source = _randomize_(timm.create_model(variant)).eval()
    target = timm.create_model(
        variant, pretrained=True, in_chans=target_chans, pretrained_cfg_overlay=dict(state_dict=source.state_dict())
    ).eval()
    expected = adapt_input_conv(target_chans, source.patch_embed.proj.weight.detach(), base_chans=source_chans)
    torch.testing.assert_close(target.patch_embed.proj.weight.detach(), expected)
    # a gray image seen as 1 channel or as 3 equal channels gives the same logits
    size = source.pretrained_cfg['input_size'][1:]
    gray = torch.randn(2, 1, *size)
    with torch.no_grad():
        out_source = source(gray.expand(-1, source_chans, -1, -1))
        out_target = target(gray.expand(-1, target_chans, -1, -1))
    assert (out_source - out_target).abs().max() <= 1e-4


def test_class_token_free_model_pools_the_mean():
    model = timm.create_model('smallvit_tiny_patch4_28', class_token=False).eval()
    assert model.cls_token is None and model.global_pool == 'avg' and model.pos_embed.shape[1] == 49
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 49, 128)
        expected = model.head(model.fc_norm(tokens.mean(dim=1)))
        assert (model(x) - expected).abs().max() <= ATOL


@pytest.mark.parametrize(('alias', 'name'), [('cls', 'token'), ('mean', 'avg'), ('token', 'token'), ('avg', 'avg')])
def test_pool_aliases(alias, name):
    model = timm.create_model('smallvit_nano_patch4_28', global_pool=alias)
    assert model.global_pool == name
    assert isinstance(model.fc_norm, LayerNorm) == (name == 'avg')


def test_mean_pooling_reads_patch_tokens_only():
    model = _randomize_(timm.create_model('smallvit_nano_patch4_28', global_pool='avg')).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, 1 + 49, D), no norm yet: norm comes after pooling
        pooled = model.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pooled, model.fc_norm(tokens[:, 1:].mean(dim=1)))


def test_direct_construction_matches_registry():
    model = SmallViT()
    assert sum(p.numel() for p in model.parameters()) == 6_457_866


def _last_block_token_counts(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Tokens each part of the last block computes in ``model(x)``, read from forward hooks."""
    seen = {}
    last = model.blocks[-1]
    hooks = [
        last.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape[1]))
        for name in ('norm1', 'attn.proj', 'mlp')
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    return seen


def _prefix_calls(monkeypatch) -> list[int]:
    """The token counts Block.forward_prefix (the trimmed last block) is called with, seen without a hook."""
    calls: list[int] = []
    real = Block.forward_prefix

    def spy(self, x, num_tokens):
        calls.append(num_tokens)
        return real(self, x, num_tokens)

    monkeypatch.setattr(Block, 'forward_prefix', spy)
    return calls


@pytest.mark.parametrize(('qkv_bias', 'grad_checkpointing'), [(False, False), (True, False), (False, True)])
def test_trimmed_last_block_gives_timm_vit_logits_and_gradients(qkv_bias, grad_checkpointing, monkeypatch):
    """With class-token pooling forward() runs the last block for the class token alone: timm's full ViT is the
    oracle for the logits and for every parameter's gradient (the q rows and the k/v rows of the last qkv apart)."""
    kwargs = dict(img_size=28, patch_size=4, embed_dim=64, depth=3, num_heads=4, qkv_bias=qkv_bias)
    ours = _randomize_(SmallViT(**kwargs)).train()  # no dropout: both models compute the same function in training
    vit = to_vision_transformer(ours).train()
    ours.set_grad_checkpointing(grad_checkpointing)
    x = torch.randn(5, 1, 28, 28)
    calls = _prefix_calls(monkeypatch)
    logits = ours(x)
    assert calls == [1]  # unobserved, the last block ran for the class token alone
    expected = vit(x)
    assert (logits - expected).abs().max() <= 1e-4
    (logits * torch.arange(10)).sum().backward()
    (expected * torch.arange(10)).sum().backward()
    theirs = dict(vit.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs[name].grad, atol=1e-4, rtol=1e-4, msg=name)
    d = ours.embed_dim
    assert ours.blocks[-1].attn.qkv.weight.grad[:d].abs().sum() > 0  # the q rows learn through the class query
    assert ours.blocks[-1].attn.qkv.weight.grad[d:].abs().sum() > 0


def test_full_last_block_where_every_token_counts(monkeypatch):
    x = torch.randn(2, 1, 28, 28)
    trimmed = timm.create_model('smallvit_nano_patch4_28').eval()
    full = timm.create_model('smallvit_nano_patch4_28', trim_last_block=False).eval()
    full.load_state_dict(trimmed.state_dict())
    calls = _prefix_calls(monkeypatch)
    with torch.no_grad():
        assert _last_block_token_counts(full, x) == {'norm1': 50, 'attn.proj': 50, 'mlp': 50}
        # a hook on the last block sees what it would see in timm's ViT: the trim steps aside
        assert _last_block_token_counts(trimmed, x) == {'norm1': 50, 'attn.proj': 50, 'mlp': 50}
        assert calls == []
        assert (full(x) - trimmed(x)).abs().max() <= ATOL
        assert calls == [1]
        # mean pooling reads every patch token: nothing to trim
        trimmed.reset_classifier(10, 'avg')
        assert _last_block_token_counts(trimmed, x) == {'norm1': 50, 'attn.proj': 50, 'mlp': 50}
        # forward_features keeps returning every token
        assert trimmed.forward_features(x).shape == (2, 50, 64)
