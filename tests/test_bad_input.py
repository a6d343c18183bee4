"""Bad input fails loudly, saying what was expected."""

import pytest
import timm
import torch

import timm_smallvit  # noqa: F401


@pytest.fixture(scope='module')
def model():
    return timm.create_model('smallvit_tiny_patch4_28').eval()


def test_wrong_channel_count(model):
    with pytest.raises(AssertionError, match=r'Expected 1 input channel\(s\), got 3.*in_chans=3'):
        model(torch.randn(1, 3, 28, 28))


def test_wrong_image_size_without_dynamic_img_size(model):
    with pytest.raises(AssertionError, match=r'Expected 28x28 images, got 32x32.*dynamic_img_size=True'):
        model(torch.randn(1, 1, 32, 32))


def test_dynamic_img_size_still_needs_whole_patches():
    model = timm.create_model('smallvit_tiny_patch4_28', dynamic_img_size=True).eval()
    assert model(torch.randn(1, 1, 32, 36)).shape == (1, 10)
    with pytest.raises(AssertionError, match=r'divisible by patch size \(4\)'):
        model(torch.randn(1, 1, 30, 32))


def test_missing_batch_dimension(model):
    with pytest.raises(AssertionError, match=r'shape \(batch, 1, height, width\), got 3 dimensions'):
        model(torch.randn(1, 28, 28))


def test_unknown_variant_name():
    with pytest.raises(RuntimeError, match=r'Unknown model \(smallvit_huge_patch4_28\)'):
        timm.create_model('smallvit_huge_patch4_28')


@pytest.mark.parametrize('pool', ['maxavg', 'cls_token', 'attn'])
def test_bad_pooling_name_lists_valid_ones(pool):
    with pytest.raises(ValueError, match=r"Unknown global_pool .*'token' \(alias 'cls'\), 'avg' \(alias 'mean'\)"):
        timm.create_model('smallvit_nano_patch4_28', global_pool=pool)
    model = timm.create_model('smallvit_nano_patch4_28')
    with pytest.raises(ValueError, match='Unknown global_pool'):
        model.reset_classifier(3, pool)
    assert model.global_pool == 'token' and model.num_classes == 10  # unchanged by the failed call


def test_token_pooling_without_class_token():
    with pytest.raises(ValueError, match='needs a class token'):
        timm.create_model('smallvit_nano_patch4_28', class_token=False, global_pool='token')


def test_unknown_weight_init():
    with pytest.raises(ValueError, match='Unknown weight_init'):
        timm.create_model('smallvit_nano_patch4_28', weight_init='jax')


def test_state_dict_of_another_shape(model):
    other = timm.create_model('smallvit_small_patch4_28')
    with pytest.raises(RuntimeError, match=r'size mismatch for blocks\.0\.attn\.qkv\.weight.*\[384, 128\]'):
        model.load_state_dict(other.state_dict())
    with pytest.raises(RuntimeError, match=r'size mismatch'):
        timm.create_model(
            'smallvit_tiny_patch4_28', pretrained=True, pretrained_cfg_overlay=dict(state_dict=other.state_dict())
        )


def test_state_dict_of_another_depth_is_not_loaded_partially():
    deeper = timm.create_model('smallvit_tiny_patch4_28', depth=8)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "blocks\.6'):
        timm.create_model(
            'smallvit_tiny_patch4_28', pretrained=True, pretrained_cfg_overlay=dict(state_dict=deeper.state_dict())
        )
