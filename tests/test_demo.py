"""The demo's whole path (train, evaluate, export, reload, compare), shortened; `make demo` runs it in full."""

import json

import pytest
import timm

from timm_smallvit.demo import run_demo
from timm_smallvit.launch import recipe_path
from timm_smallvit.recipe import load_recipe


@pytest.mark.slow
def test_demo_trains_exports_and_reloads(tmp_path, fmnist_src, capsys):
    result = run_demo(fmnist_src, tmp_path, epochs=1, train_num_samples=4096)
    out = capsys.readouterr().out
    assert 'Fashion-MNIST test top-1' in out and 'identical logits' in out
    assert f'model card: {result["export_dir"] / "README.md"}' in out
    assert 40.0 < result['top1'] <= 100.0  # 4k images, one epoch: well above chance, not a full run
    summary = (result['run_dir'] / 'summary.csv').read_text().splitlines()
    assert f'{result["top1"]:.2f}' in summary[-1]  # the demo's own count agrees with the trainer's evaluation
    config = json.loads((result['export_dir'] / 'config.json').read_text())
    assert config['architecture'] == load_recipe(recipe_path('fashion_mnist_demo'))['model']
    model = timm.create_model(f'local-dir:{result["export_dir"]}', pretrained=True)
    assert model.pretrained_cfg['label_names'][0] == 'T-shirt/top'


def test_demo_recipe_is_the_measured_one():
    recipe = load_recipe(recipe_path('fashion_mnist_demo'))
    assert recipe['model'] == 'smallvit_tiny_convstem_28' and recipe['dataset'] == 'torch/fashion_mnist'
    assert recipe['epochs'] <= 5  # the demo must fit in 5 minutes on 2 CPU cores
