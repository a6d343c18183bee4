"""Inference speed of the shipped weights on this CPU, with top-1 beside each figure: PyTorch float32, PyTorch bf16
autocast, onnxruntime float32 and onnxruntime int8, at batch 1 (latency) and batch 256 (throughput), in one run.

    python scripts/deploy_speed.py --data ../shared/data/fashion-mnist --out docs/results/deploy_speed

Writes results.json and results.md (the table docs/deploy.md shows). Top-1 is on the first --images Fashion-MNIST test
images through timm's eval transform, batch 256. Run it alone on the machine: other work skews every figure.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

import timm_smallvit
from timm_smallvit import smallvit
from timm_smallvit.data import load_fashion_mnist
from timm_smallvit.onnx_export import OnnxClassifier, export_onnx

ENGINES = ('pytorch_fp32', 'pytorch_bf16', 'onnxruntime_fp32', 'onnxruntime_int8')


def cpu_name() -> str:
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith('Model name:'):
                return line.split(':', 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def timed(run: Callable[[torch.Tensor], object], x: torch.Tensor, seconds: float, min_calls: int) -> dict:
    """Calls of ``run(x)`` for at least ``seconds`` and ``min_calls``, after 3 warm-up calls: img/s and median ms."""
    for _ in range(3):
        run(x)
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return {
        'img_per_s': round(len(x) * len(times) / sum(times), 1),
        'median_ms': round(statistics.median(times) * 1000, 3),
        'calls': len(times),
    }


def engines(model: torch.nn.Module, work: Path, threads: int) -> dict[str, Callable[[torch.Tensor], np.ndarray]]:
    def pytorch(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(x).float().numpy()

    def pytorch_bf16(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
            return model(x).float().numpy()

    fp32 = OnnxClassifier(export_onnx(model, work / 'fp32.onnx'), threads=threads)
    int8 = OnnxClassifier(export_onnx(model, work / 'int8.onnx', quantize='int8'), threads=threads)
    return dict(zip(ENGINES, (pytorch, pytorch_bf16, fp32, int8), strict=True))


def measure(
    name: str, data: str, n_images: int, batch_sizes: list[int], seconds: float, min_calls: int, threads: int
) -> list[dict]:
    model = timm.create_model(name, pretrained=True).eval()
    transform = create_transform(**resolve_model_data_config(model))
    images, targets = load_fashion_mnist(data, train=False)
    x = torch.stack([transform(Image.fromarray(img.numpy(), mode='L')) for img in images[:n_images]])
    targets = targets[:n_images]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for engine, run in engines(model, Path(work), threads).items():
            logits = np.concatenate([run(x[i : i + 256]) for i in range(0, len(x), 256)])
            row = {
                'model': name,
                'engine': engine,
                'top1': round(float((logits.argmax(-1) == targets.numpy()).mean()) * 100, 2),
            }
            for bs in batch_sizes:
                batch = x[:bs] if bs <= len(x) else x[torch.arange(bs) % len(x)]
                row[f'batch_{bs}'] = timed(run, batch, seconds, min_calls)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], batch_sizes: list[int], env: str, n_images: int) -> str:
    head = ['model', 'engine', f'top-1 ({n_images} test images)']
    head += [f'batch {bs}: img/s' for bs in batch_sizes] + [f'batch {bs}: median ms' for bs in batch_sizes[:1]]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        cells = [r['model'], r['engine'], f'{r["top1"]:.2f}']
        cells += [f'{r[f"batch_{bs}"]["img_per_s"]:,.0f}' for bs in batch_sizes]
        cells += [f'{r[f"batch_{bs}"]["median_ms"]:.3f}' for bs in batch_sizes[:1]]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + f'\n\n{env}\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', required=True, help='folder with the Fashion-MNIST release *-ubyte.gz files')
    parser.add_argument('--out', help='folder for results.json and results.md')
    parser.add_argument('--models', nargs='*', default=sorted(smallvit.PRETRAINED))
    parser.add_argument('--images', type=int, default=10000, help='test images for top-1 (default all 10,000)')
    parser.add_argument('--batch-sizes', type=int, nargs='*', default=[1, 256])
    parser.add_argument('--seconds', type=float, default=5.0, help='time each figure for at least this long')
    parser.add_argument('--min-calls', type=int, default=20)
    parser.add_argument('--threads', type=int, default=os.cpu_count(), help='PyTorch and onnxruntime threads')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault('OMP_NUM_THREADS', str(args.threads))
    rows = [
        r
        for name in args.models
        for r in measure(name, args.data, args.images, args.batch_sizes, args.seconds, args.min_calls, args.threads)
    ]
    import onnxruntime

    env = (
        f'CPU: {cpu_name()}, {args.threads} threads; timm-smallvit {timm_smallvit.__version__}, torch '
        f'{torch.__version__}, onnxruntime {onnxruntime.__version__}; int8: dynamic (MatMul/Gemm)'
    )
    table = markdown(rows, args.batch_sizes, env, args.images)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / 'results.json').write_text(json.dumps({'rows': rows, 'environment': env}, indent=2) + '\n')
        (out / 'results.md').write_text(table)


if __name__ == '__main__':
    main()
