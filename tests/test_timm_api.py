"""What timm's own tests/test_models.py checks of every model, run on every registered smallvit name.

Adapted from timm's test_model_forward, _backward, _default_cfgs_non_std (ViTs output tokens, not maps),
_forward_torchscript, _forward_features, _forward_intermediates(_features) and _forward_fx; plus torch.compile.
Differences, on purpose: feature levels are min(3, depth), since the seed model has only 2 blocks.
"""

import math

import pytest
import timm
import torch
from timm import set_scriptable
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import timm_smallvit  # noqa: F401

MODEL_NAMES = timm.list_models('smallvit*')


def _input_size(model) -> tuple[int, int, int]:
    return model.pretrained_cfg['input_size']


def test_family_is_registered():
    assert 'smallvit' in MODEL_NAMES and len(MODEL_NAMES) >= 6
    assert all(timm.is_model(n) for n in MODEL_NAMES)
    assert set(timm.list_models(module='smallvit')) == set(MODEL_NAMES)


def test_variants_span_small_image_sizes():
    params = {}
    for name in MODEL_NAMES:
        model = timm.create_model(name)
        params[name] = sum(p.numel() for p in model.parameters())
        size = _input_size(model)[-1]
        assert name == 'smallvit' or name.endswith(f'_{size}')
        assert name == 'smallvit' or f'patch{model.patch_embed.patch_size[0]}_' in name or '_convstem_' in name
    small = [n for n in MODEL_NAMES if n.endswith(('_28', '_32')) and '_patch' in n]
    assert len(small) >= 3 and all(timm.create_model(n).patch_embed.patch_size[0] <= 4 for n in small)
    assert min(params[n] for n in small) <= 350_000 and max(params[n] for n in small) >= 5_000_000
    assert any(n.endswith('_64') for n in MODEL_NAMES) and any(n.endswith('_96') for n in MODEL_NAMES)


# the model_kwargs with which the GPU runs (the recipe sweep's plan_lr.yaml) trained smallvit_tiny_convstem_28
GPU_RUNS_MODEL_KWARGS = dict(
    patch_size=4, stem_chs=[32, 64, 128], stem_strides=[1, 1, 2], embed_dim=256, depth=6, num_heads=8
)


def test_medium_convstem_is_the_architecture_the_gpu_runs_measured():
    measured = timm.create_model('smallvit_tiny_convstem_28', **GPU_RUNS_MODEL_KWARGS)
    model = timm.create_model('smallvit_medium_convstem_28')
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in measured.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == 5_136_106
    assert model.patch_embed.grid_size == (7, 7) and model.global_pool == 'avg' and model.cls_token is None


@pytest.mark.parametrize('model_name', MODEL_NAMES)
@pytest.mark.parametrize('in_chans', [1, 3])
def test_forward_native_size_gray_and_rgb(model_name, in_chans):
    model = timm.create_model(model_name, in_chans=in_chans).eval()
    _, h, w = _input_size(model)
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, h, w))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_forward_and_grad_checkpointing(model_name):
    model = timm.create_model(model_name).eval()
    inputs = torch.randn(1, *_input_size(model))
    with torch.no_grad():
        outputs = model(inputs)
        model.set_grad_checkpointing()
        outputs2 = model(inputs)
    assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()
    assert torch.allclose(outputs, outputs2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_backward(model_name):
    model = timm.create_model(model_name, num_classes=42).train()
    inputs = torch.randn(2, *_input_size(model))
    outputs = model(inputs)
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f'No gradient for {n}'
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_create_model_device_and_dtype(model_name):
    # timm's factory passes device/dtype to the constructor (timm.task's distillation teacher always does)
    reference = timm.create_model(model_name).state_dict()
    meta = timm.create_model(model_name, device='meta').state_dict()
    assert {k: v.shape for k, v in meta.items()} == {k: v.shape for k, v in reference.items()}
    assert {v.device.type for v in meta.values()} == {'meta'}

    model = timm.create_model(model_name, dtype=torch.bfloat16).eval()
    floats = {k: v.dtype for k, v in model.state_dict().items() if v.is_floating_point()}
    assert set(floats.values()) == {torch.bfloat16}, floats
    with torch.no_grad():
        out = model(torch.randn(2, *_input_size(model), dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_default_cfgs(model_name):
    model = timm.create_model(model_name).eval()
    cfg = model.pretrained_cfg
    for key in ('input_size', 'mean', 'std', 'num_classes', 'interpolation', 'crop_pct', 'license', 'first_conv'):
        assert cfg.get(key) is not None, key
    assert len(cfg['mean']) == len(cfg['std']) == cfg['input_size'][0] == model.in_chans
    assert model.num_classes == cfg['num_classes'] and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    assert cfg['classifier'] + '.weight' in state_dict
    assert cfg['first_conv'] + '.weight' in state_dict

    x = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        outputs = model.forward_features(x)
        outputs_pre = model.forward_head(outputs, pre_logits=True)
        assert outputs.shape[-1] == model.num_features
        assert outputs.shape[1] == model.patch_embed.num_patches + model.num_prefix_tokens
        assert outputs_pre.shape[1] == model.head_hidden_size

        model.reset_classifier(0)
        assert model.num_classes == 0
        outputs = model(x)
        assert outputs.shape == outputs_pre.shape == (1, model.head_hidden_size)

        model.reset_classifier(0, '')
        assert model(x).ndim == 3  # no pooling: all tokens

        model = timm.create_model(model_name, num_classes=0).eval()
        assert model(x).shape == (1, model.num_features)

        model.reset_classifier(5, 'avg')
        assert model(x).shape == (1, 5) and model.get_classifier().out_features == 5


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_forward_torchscript(model_name):
    with set_scriptable(True):
        model = timm.create_model(model_name).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, *_input_size(model))
    with torch.no_grad():
        out = scripted(x)
        assert out.shape == (1, 10) and not torch.isnan(out).any()
        torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_forward_features(model_name):
    model = timm.create_model(model_name, features_only=True).eval()
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    depth = timm.create_model(model_name).blocks.__len__()
    assert len(expected_channels) == min(3, depth)
    input_size = _input_size(model)
    with torch.no_grad():
        outputs = model(torch.randn(1, *input_size))
    assert len(outputs) == len(expected_channels)
    feat_axis, spatial_axis = get_channel_dim('NCHW'), get_spatial_dim('NCHW')
    for e, r, o in zip(expected_channels, expected_reduction, outputs, strict=True):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(input_size[1] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(input_size[2] / r) + 1
        assert not torch.isnan(o).any()


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_forward_intermediates(model_name):
    model = timm.create_model(model_name).eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    input_size = _input_size(model)
    x = torch.randn(1, *input_size)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x, output_fmt='NCHW')
        assert len(intermediates) == len(model.blocks)
        grid = model.patch_embed.dynamic_feat_size(input_size[1:])  # 28 // 4 for patches, ceil(28 / 8) for stems
        for e, r, o in zip(feature_info.channels(), feature_info.reduction(), intermediates, strict=True):
            assert o.shape == (1, e, *grid) and r == model.patch_embed.patch_size[0]
        torch.testing.assert_close(output, model.forward_features(x))

        tokens = model.forward_intermediates(x, indices=[0], output_fmt='NLC', intermediates_only=True)
        assert tokens[0].shape == (1, model.patch_embed.num_patches, model.embed_dim)
        with_prefix = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
        if model.num_prefix_tokens:
            assert with_prefix[0][1].shape == (1, model.num_prefix_tokens, model.embed_dim)
        else:  # nothing to return beside the spatial tokens
            assert isinstance(with_prefix[0], torch.Tensor) and with_prefix[0].shape == (1, model.embed_dim, *grid)

        model.set_grad_checkpointing()
        output3, _ = model.forward_intermediates(x, output_fmt='NCHW')
        assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5)

        pruned = timm.create_model(model_name).eval()
        pruned.load_state_dict(model.state_dict())
        kept = pruned.prune_intermediate_layers(indices=[0], prune_norm=True)
        assert kept == [0] and len(pruned.blocks) == 1 and pruned.num_classes == 0
        only = pruned.forward_intermediates(x, indices=[0], intermediates_only=True)
        torch.testing.assert_close(only[0], intermediates[0])


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_forward_fx(model_name):
    model = timm.create_model(model_name).eval()
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(
        model, train_return_nodes=[eval_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    ).eval()
    x = torch.randn(1, *_input_size(model))
    with torch.no_grad():
        out = fx_model(x)
        out = out[next(iter(out))] if isinstance(out, dict) else out
        torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_compiles_without_graph_breaks(model_name):
    torch._dynamo.reset()  # every variant shares forward's code object: don't count them as recompiles
    model = timm.create_model(model_name).eval()
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    x = torch.randn(2, *_input_size(model))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_seed_trains_compiled_in_one_graph():
    """The seed's dropout in training: under torch.compile it is F.dropout (drawn inside inductor's kernels), where the
    eager CPU mask's in-place random_ would break the graph at each of its seven dropouts."""
    torch._dynamo.reset()
    model = timm.create_model('smallvit').train()
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    out = compiled(torch.randn(2, 1, 96, 96))
    out.sum().backward()
    assert out.shape == (2, 10) and model.blocks[0].mlp.fc1.weight.grad is not None


def test_model_compiles_with_inductor():
    """One real (inductor) compile of a small variant, forward and backward, as `smallvit train --compile` uses."""
    torch._dynamo.reset()
    model = timm.create_model('smallvit_nano_patch4_28').train()
    reference = timm.create_model('smallvit_nano_patch4_28', drop_rate=0.0).train()
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model)
    x = torch.randn(4, 1, 28, 28)
    out = compiled(x)
    out.sum().backward()
    ref_out = reference(x)
    ref_out.sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        model.patch_embed.proj.weight.grad, reference.patch_embed.proj.weight.grad, rtol=1e-3, atol=1e-4
    )


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_no_weight_decay_and_group_matcher(model_name):
    model = timm.create_model(model_name)
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(names)
    assert len(groups) == len(model.blocks) + 2  # stem, each block, final norm + head
