"""scripts/benchmark.py: a tiny end-to-end run, and the parts its numbers rest on (FLOPs, dropout, memory)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from timm_smallvit import amp as amp_module
from timm_smallvit.launch import recipe_path
from timm_smallvit.recipe import load_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def bench():
    spec = importlib.util.spec_from_file_location('smallvit_benchmark', REPO_ROOT / 'scripts' / 'benchmark.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_run_prints_tables_and_writes_json(bench, tmp_path, capsys):
    out_json = tmp_path / 'bench.json'
    threads = torch.get_num_threads()
    argv = ['--shapes', '28px', '--batch-sizes', '2', '--rounds', '2', '--no-compile', '--bf16', 'skip']
    argv += ['--sweep-sizes', '28', '56', '--sweep-batch', '1', '--sweep-rounds', '1', '--min-time', '0.01']
    argv += ['--layout-batch-sizes', '2', '--warmup', '1', '--mm-size', '256', '--threads', '1']
    argv += ['--json', str(out_json)]
    try:
        result = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    tables = ('| batch | model | mode | train img/s |', 'Memory layout of the conv stem', 'Image size sweep')
    for text in (*tables, "Issue 6's targets", 'native bf16:'):
        assert text in out
    assert 'not run (batch 128 not in this run)' in out
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(result))
    assert out_json.with_suffix('.md').read_text().strip() in out

    benches = result['benches']
    compare = [b for b in benches if b['section'] == 'compare']
    assert {b['model'] for b in compare} == {'smallvit', 'timm ViT', 'textbook'}
    assert all(b['skipped'] == 'bf16 off' for b in compare if b['mode'] == 'bf16-autocast')
    timed = [b for b in benches if not b['skipped']]
    assert all(b['images_per_s'] > 0 and len(b['seconds_per_step_per_round']) == 2 for b in compare if b in timed)
    assert result['peaks_flops_per_s']['fp32'] > 0
    assert all(b['minor_page_faults_per_step'] >= 0 for b in compare if b in timed)

    def get(model, kind):
        return next(b for b in compare if b['model'] == model and b['kind'] == kind and b['mode'] == 'fp32')

    # smallvit's last block runs for the class token alone: 2 N (12 d^2) + 4 N^2 d FLOPs per image forward in
    # timm's ViT and the textbook model, 2 (2 N d^2 + 10 d^2) + 4 N d in smallvit (N = 50 tokens, d = 192, batch 2)
    n, d = 50, 192
    saved = 2 * (2 * n * 12 * d**2 + 4 * n**2 * d - 2 * (2 * n * d**2 + 10 * d**2) - 4 * n * d)
    assert get('timm ViT', 'infer')['flops_per_step'] - get('smallvit', 'infer')['flops_per_step'] == saved
    assert get('textbook', 'infer')['flops_per_step'] == get('timm ViT', 'infer')['flops_per_step']
    assert 0 < get('smallvit', 'train')['flops_per_step'] < get('timm ViT', 'train')['flops_per_step']

    params = 2_679_946 * 4 / 2**20  # smallvit_small_patch4_28 in fp32, MiB
    train, infer = get('smallvit', 'train')['memory'], get('smallvit', 'infer')['memory']
    assert train['held_mib'] >= 3 * params  # parameters, gradients and AdamW's two moments (grads may be freed)
    assert train['peak_mib'] > train['held_mib'] and train['step_peak_mib'] > 0
    assert params <= infer['held_mib'] < params + 1 and infer['peak_mib'] < train['peak_mib']

    # the layout timing runs one model in both layouts: same work, both timed
    layout = [b for b in benches if b['section'] == 'layout']
    assert sorted((b['mode'], b['kind']) for b in layout) == [
        ('channels-last', 'infer'),
        ('channels-last', 'train'),
        ('fp32', 'infer'),
        ('fp32', 'train'),
    ]
    assert len({b['flops_per_step'] for b in layout if b['kind'] == 'train'}) == 1
    assert all(b['images_per_s'] > 0 for b in layout)
    assert '| 2 | channels_last |' in out

    sweep = [b for b in benches if b['section'] == 'sweep']
    assert [(b['img_size'], b['tokens']) for b in sweep if b['kind'] == 'infer'] == [(28, 50), (56, 197)]


def test_target_lines_give_the_ratio_and_the_ceiling_of_the_bf16_peak(bench):
    def timed(model, mode, seconds, kind='train', flops=100e9):
        b = bench.Bench('compare', '28px', model, mode, kind, 128, flops=flops)
        b.times = [seconds]
        return b

    benches = [
        timed('smallvit', 'bf16-autocast', 0.5),  # 200 GFLOP/s
        timed('timm ViT', 'bf16-autocast', 1.0),  # 100 GFLOP/s: 25% of a 400 GFLOP/s peak
        timed('smallvit', 'fp32', 2.0),
        timed('timm ViT', 'fp32', 2.0),
        # inference: smallvit does half timm's FLOPs (a trimmed last block), so its ceiling is twice as far
        timed('smallvit', 'bf16-autocast', 0.5, 'infer', flops=50e9),
        timed('timm ViT', 'bf16-autocast', 1.0, 'infer'),
        timed('smallvit', 'fp32', 1.0, 'infer', flops=50e9),
        timed('timm ViT', 'fp32', 2.0, 'infer'),
    ]
    lines = bench.target_lines(benches, {'bf16': 400e9, 'fp32': 150e9})
    line = next(x for x in lines if x.startswith('- 28px, batch 128, train'))
    assert '2.00× (target ≥ 2.0×: met; at the bf16 matmul peak it would be 4.00×); in fp32: 1.00×' in line
    line = next(x for x in lines if x.startswith('- 28px, batch 128, infer'))
    assert '2.00× (target ≥ 1.5×: met; at the bf16 matmul peak it would be 8.00×); in fp32: 2.00×' in line
    assert any('seed, batch 64' in x and 'not run' in x for x in lines)


def test_cpu_attention_flops_are_counted(bench):
    """FlopCounterMode misses the CPU attention kernel by itself; the script adds it: 4 N^2 D per block forward
    (4 N D in smallvit's last block, where the class token alone is the query)."""
    models = bench.build_models('smallvit_small_patch4_28', names=('smallvit', 'timm ViT'))
    for name, attention_flops in (('smallvit', 4 * (5 * 50**2 + 50) * 192), ('timm ViT', 6 * 4 * 50**2 * 192)):
        model = models[name].model
        counted = bench.count_flops(model, (1, 28, 28), 10, 'infer')
        x = torch.randn(1, 1, 28, 28)
        with FlopCounterMode(display=False) as plain, torch.no_grad():
            # FlopCounterMode's module hooks make smallvit run its full last block: count the unobserved forward
            model.forward_head(model.forward_class_token(x)) if name == 'smallvit' else model(x)
        assert counted - plain.get_total_flops() == attention_flops, name


def test_timm_vit_and_textbook_get_the_seed_dropout(bench):
    models = bench.build_models('smallvit')

    def rates(name):
        return {n: m.p for n, m in models[name].model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0}

    assert rates('smallvit') == rates('timm ViT') and len(rates('smallvit')) == 7  # pos + 3 per block
    assert set(rates('textbook').values()) == {0.1}


def test_options_and_warnings(bench):
    quick, full = bench.parse_args(['--quick']), bench.parse_args([])
    assert (quick.rounds, quick.compile, quick.batch_sizes) == (2, False, [1, 8])
    assert (full.rounds, full.compile, full.batch_sizes) == (5, True, None)
    assert (quick.layout_batch_sizes, full.layout_batch_sizes) == ([8], [128])
    assert bench.parse_args(['--layout-batch-sizes']).layout_batch_sizes == []  # none: the layout timing is skipped
    assert bench.parse_args(['--quick', '--compile']).compile
    assert bench.busy_warning(0.3, 2, 2) == ''
    assert '--threads 1' in bench.busy_warning(2.0, 2, 2)


def test_a_recipes_own_step_is_timed_with_its_flops_share_and_profile(bench, tmp_path, capsys, fmnist_src, monkeypatch):
    monkeypatch.setattr(amp_module, 'bf16_speedup', lambda step: 2.0)  # the step's own probe, decided here
    out_json = tmp_path / 'bench.json'
    threads = torch.get_num_threads()
    argv = ['--quick', '--shapes', '--sweep-sizes', '--layout-batch-sizes', '--mm-size', '256', '--threads', '1']
    argv += ['--recipes', 'fashion_mnist_28', '--data', str(fmnist_src), '--json', str(out_json)]
    try:
        result = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "The recipes' own training step" in out and 'Profile of 2 training steps of fashion_mnist_28' in out
    (run,) = result['recipes']
    recipe = load_recipe(recipe_path('fashion_mnist_28'))
    assert run['model'] == recipe['model'] and run['batch'] == recipe['batch_size'] and run['channels_last']
    assert (
        run['amp'] == amp_module.cpu_has_native_bf16() and run['ema'] and run['eval_views'] == 2
    )  # as the recipe trains here
    compute = ('bf16' if run['amp'] else 'fp32') + ', NHWC'
    assert f'| fashion_mnist_28 | {recipe["model"]} | {recipe["batch_size"]} | {compute} |' in out
    assert run['train_images_per_s'] > 0 and run['eval_images_per_s'] > 0
    # the counted FLOPs are the model's: a training step costs about three forward passes
    assert 2.5 < run['flops_per_image_train'] / run['flops_per_image_infer'] < 3.5
    assert 'aten::' in run['profile'] and 'convolution' in run['profile']
    assert json.loads(out_json.read_text())['recipes'][0]['recipe'] == 'fashion_mnist_28'
