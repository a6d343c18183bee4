"""Shipped pretrained weights: listed and loaded by name offline, as accurate as stated, fine-tunable, checked."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from huggingface_hub import ModelCard
from timm.data import create_transform, resolve_model_data_config
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from torchvision.datasets import FashionMNIST

from timm_smallvit import smallvit
from timm_smallvit.data import FASHION_MNIST_CLASSES, prepare_fashion_mnist
from timm_smallvit.launch import recipe_path
from timm_smallvit.recipe import load_recipe

from .conftest import REPO_ROOT

SHIPPED = sorted(smallvit.PRETRAINED)


@pytest.fixture
def offline(monkeypatch):
    """No Hub, whatever the cfg names: timm's hub loaders fail the test if they are reached."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')

    def refuse(*args, **kwargs):
        raise AssertionError(f'tried the Hub: {args}')

    monkeypatch.setattr(timm.models._builder, 'load_state_dict_from_hf', refuse)
    monkeypatch.setattr(timm.models._builder, 'load_state_dict_from_url', refuse)


def _folder(name: str) -> Path:
    return smallvit.PRETRAINED_DIR / name


def _evaluate(model: torch.nn.Module, fmnist_src: Path) -> tuple[float, float]:
    # as a user runs it: timm's data config and eval transform on the PIL images
    model.eval()
    transform = create_transform(**resolve_model_data_config(model))
    test = FashionMNIST(prepare_fashion_mnist(fmnist_src), train=False, transform=transform)
    hits1 = hits5 = 0
    with torch.inference_mode():
        for start in range(0, len(test), 1000):
            x = torch.stack([test[i][0] for i in range(start, start + 1000)])
            top5 = model(x).topk(5, -1).indices
            y = test.targets[start : start + 1000]
            hits1 += (top5[:, 0] == y).sum().item()
            hits5 += (top5 == y[:, None]).any(-1).sum().item()
    return hits1 / 100, hits5 / 100


def test_list_pretrained_names_the_shipped_weights():
    listed = timm.list_pretrained('smallvit*')
    assert {'smallvit_tiny_convstem_28.fmnist', 'smallvit_nano_patch4_28.fmnist'} <= set(listed)
    assert len(SHIPPED) >= 2


@pytest.mark.parametrize('name', SHIPPED)
def test_cfg_carries_what_timm_users_read(name):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    assert cfg['file'] == str(_folder(name) / 'model.safetensors') and Path(cfg['file']).is_file()
    assert cfg['hf_hub_id'] == f'timm-smallvit/{name}'
    assert cfg['input_size'] == (1, 28, 28) and cfg['mean'] == (0.5,) and cfg['std'] == (0.5,)
    assert cfg['interpolation'] == 'bilinear' and cfg['crop_pct'] == 1.0 and cfg['num_classes'] == 10
    assert tuple(cfg['label_names']) == FASHION_MNIST_CLASSES
    weights = smallvit.PRETRAINED[name]
    assert f'top-1 {weights["top1"]:.2f}%, top-5 {weights["top5"]:.2f}%' in cfg['notes'][0]
    assert 'MIT licence' in cfg['notes'][1]
    # the files beside the weights: card, config, the run's args (a shipped recipe, with one command to repeat it)
    names = sorted(p.name for p in _folder(name).iterdir())
    expected = ['README.md', 'args.yaml', 'config.json', 'learning_curve.png', 'model.safetensors', 'predictions.png']
    assert names == expected
    assert all(p.stat().st_size < 5.2e6 for p in _folder(name).iterdir())
    args = yaml.safe_load((_folder(name) / 'args.yaml').read_text())
    recipe = load_recipe(recipe_path(weights['recipe']))
    assert args['model'] == recipe['model'] == name.split('.')[0]
    # amp: False where the CPU's bf16 was slower; seed: the better of a recipe's seeds may ship
    fitted = ('epochs', 'crop_off_epoch', 'data_dir', 'amp', 'seed')
    assert all(args[k] == v for k, v in recipe.items() if k not in fitted)
    assert args['amp'] in (recipe.get('amp', False), False)
    card = (_folder(name) / 'README.md').read_text()
    assert f'smallvit train --config {weights["recipe"]}' in card
    # the card names the compute the run used, which args.yaml records
    assert ("under the recipe's bf16 autocast" if args['amp'] else 'log below was measured in float32') in card


@pytest.mark.slow
@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_weights_load_offline_and_score_what_the_cfg_and_card_state(name, fmnist_src, offline):
    model = timm.create_model(name, pretrained=True)
    assert model.pretrained_cfg['tag'] == name.split('.')[1]
    expected = safetensors.torch.load_file(_folder(name) / 'model.safetensors')
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    top1, top5 = _evaluate(model, fmnist_src)
    weights = smallvit.PRETRAINED[name]
    assert abs(top1 - weights['top1']) < 0.01 and abs(top5 - weights['top5']) < 0.01, (top1, top5)
    card = ModelCard.load(_folder(name) / 'README.md')
    stated = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert stated['accuracy'] == pytest.approx(top1, abs=0.01)
    assert stated['top_5_accuracy'] == pytest.approx(top5, abs=0.01)
    assert all(r.dataset_split == 'test' for r in card.data.eval_results)
    assert f'top-1 {top1:.2f}%' in card.text


@pytest.mark.parametrize('name', SHIPPED)
def test_fine_tuning_resets_the_head_adapts_the_input_conv_and_resamples_positions(name, offline):
    shipped = safetensors.torch.load_file(_folder(name) / 'model.safetensors')
    first_conv = timm.models.get_pretrained_cfg(name).first_conv + '.weight'

    five = timm.create_model(name, pretrained=True, num_classes=5)
    assert five.head.weight.shape[0] == 5
    for key, value in five.state_dict().items():
        if not key.startswith('head.'):
            assert torch.equal(value, shipped[key]), key

    rgb = timm.create_model(name, pretrained=True, in_chans=3)
    expected_conv = adapt_input_conv(3, shipped[first_conv], base_chans=1)  # timm's adaptation from 1 channel
    torch.testing.assert_close(rgb.state_dict()[first_conv], expected_conv)
    assert rgb.state_dict()[first_conv].shape[1] == 3
    assert torch.equal(rgb.state_dict()['head.weight'], shipped['head.weight'])

    big = timm.create_model(name, pretrained=True, img_size=56)
    grid = big.patch_embed.grid_size
    prefix = big.num_prefix_tokens
    expected = resample_abs_pos_embed(shipped['pos_embed'], list(grid), num_prefix_tokens=prefix)
    torch.testing.assert_close(big.pos_embed.detach(), expected)
    assert big(torch.randn(2, 1, 56, 56)).shape == (2, 10)


@pytest.mark.parametrize('arch', sorted({name.split('.')[0] for name in SHIPPED}))
def test_the_untagged_name_loads_the_most_accurate_shipped_tag(arch, offline):
    # timm's rule: the first tag registered for an architecture is its default, which pretrained=True loads
    tags = {name: w['top1'] for name, w in smallvit.PRETRAINED.items() if name.split('.')[0] == arch}
    best = max(tags, key=tags.__getitem__)
    assert timm.models.get_pretrained_cfg(arch).to_dict()['file'] == str(_folder(best) / 'model.safetensors')
    model = timm.create_model(arch, pretrained=True)
    assert f'{arch}.{model.pretrained_cfg["tag"]}' == best
    shipped = safetensors.torch.load_file(_folder(best) / 'model.safetensors')
    assert all(torch.equal(value, shipped[key]) for key, value in model.state_dict().items())


def test_the_readme_table_states_every_shipped_tag_as_the_registry_does():
    readme = (REPO_ROOT / 'README.md').read_text()
    rows = {line.split('|')[1].strip(' `'): line for line in readme.splitlines() if line.startswith('| `smallvit_')}
    for name, weights in smallvit.PRETRAINED.items():
        assert name in rows, f'README.md: no row for {name} in "Pretrained weights"'
        assert f'| {weights["top1"]:.2f}% | {weights["top5"]:.2f}% |' in rows[name], rows[name]
        params = sum(p.numel() for p in timm.create_model(name).parameters())
        assert f'| {params:,} |' in rows[name], rows[name]


def test_unknown_tag_gets_timms_error_with_the_tags_that_exist():
    with pytest.raises(RuntimeError, match=r'Invalid pretrained tag \(imagenet\).*smallvit_tiny_convstem_28\.fmnist'):
        timm.create_model('smallvit_tiny_convstem_28.imagenet', pretrained=True)


@pytest.mark.parametrize('damage', ['flipped_byte', 'truncated'])
def test_a_damaged_packaged_file_is_refused_by_name_never_loaded(damage, tmp_path, monkeypatch, offline):
    name = 'smallvit_tiny_convstem_28.fmnist'
    copy = tmp_path / name
    shutil.copytree(_folder(name), copy)
    weights = copy / 'model.safetensors'
    data = bytearray(weights.read_bytes())
    if damage == 'flipped_byte':
        data[-100] ^= 0x01  # inside a tensor: safetensors alone would load it
    else:
        data = data[: len(data) // 2]
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(smallvit, 'PRETRAINED_DIR', tmp_path)
    with pytest.raises(ValueError, match=rf'{weights}: the packaged {name} weights are damaged'):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))


def test_untrained_models_of_the_same_name_carry_no_claims_into_an_export(tmp_path):
    # the default cfg of smallvit_tiny_convstem_28 describes the shipped weights; a user's own export must not
    from timm_smallvit import export_checkpoint

    model = timm.create_model('smallvit_tiny_convstem_28', num_classes=7)
    safetensors.torch.save_file(model.state_dict(), tmp_path / 'w.safetensors')
    out = export_checkpoint(tmp_path / 'w.safetensors', tmp_path / 'out', model_name='smallvit_tiny_convstem_28')
    config = (out / 'config.json').read_text()
    assert 'Fashion-MNIST test top-1' not in config and 'T-shirt' not in config and 'fmnist' not in config


@pytest.mark.slow
def test_a_wheel_carries_the_weights_and_loads_them_offline_when_installed(tmp_path):
    wheels = tmp_path / 'wheels'
    build = subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--quiet', '-w', str(wheels), str(REPO_ROOT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    if build.returncode and 'No matching distribution found for hatchling' in build.stderr:
        pytest.skip('the build backend (hatchling) could not be installed: no package index reachable')
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob('timm_smallvit-*.whl')
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    for name in SHIPPED:
        for file in ('model.safetensors', 'config.json', 'README.md', 'args.yaml'):
            assert f'timm_smallvit/pretrained/{name}/{file}' in names
    print(f'wheel {wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB')

    # a fresh virtualenv, not editable: its dependencies come from this one's site-packages by path (no .pth of
    # this environment runs there, so the editable checkout is not importable)
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
    python = venv / 'bin' / 'python'
    site = subprocess.check_output([str(python), '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'])
    deps = [p for p in sys.path if p.endswith('site-packages')]
    (Path(site.decode().strip()) / 'deps.pth').write_text('\n'.join(deps) + '\n')
    subprocess.run([str(python), '-m', 'pip', 'install', '--no-deps', '--quiet', str(wheel)], check=True)
    code = (
        'import timm, timm_smallvit, torch; '
        'm = timm.create_model("smallvit_tiny_convstem_28.fmnist", pretrained=True).eval(); '
        'torch.manual_seed(0); x = torch.randn(2, 1, 28, 28); '
        'print(timm_smallvit.__file__); torch.save(m(x).detach(), "logits.pt")'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith('PYTHON')}
    env['HF_HUB_OFFLINE'] = '1'
    where = subprocess.check_output([str(python), '-c', code], cwd=tmp_path, env=env, text=True).strip()
    assert where.startswith(str(venv)), where
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    local = timm.create_model('smallvit_tiny_convstem_28.fmnist', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / 'logits.pt', weights_only=True), local(x))
