"""Top-1 of the shipped weights on the 10,000 Fashion-MNIST test images: PyTorch float32, onnxruntime float32, and
onnxruntime int8 by each method (dynamic: MatMul/Gemm weights; static: also the conv stem, calibrated on training
images). docs/deploy.md shows its output; `--quantize int8` uses the method that held top-1 within 0.3 points.

    python scripts/onnx_int8_accuracy.py --data ../shared/data/fashion-mnist --out docs/results/onnx_int8
"""

import argparse
import json
import platform
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

import timm_smallvit
from timm_smallvit import smallvit
from timm_smallvit.data import load_fashion_mnist
from timm_smallvit.onnx_export import INT8_METHODS, OnnxClassifier, export_onnx

TOLERANCE = 0.3  # points of top-1 that int8 may lose against float


def preprocessed(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> the model's input through timm's eval transform on PIL images, as a user runs it."""
    transform = create_transform(**resolve_model_data_config(model))
    return torch.stack([transform(Image.fromarray(img.numpy(), mode='L')) for img in images])


def calibration_set(model: torch.nn.Module, data: str, n: int) -> torch.Tensor:
    """The first ``n`` training images, n / 10 of each class."""
    images, labels = load_fashion_mnist(data, train=True)
    picked = torch.cat([torch.nonzero(labels == c).flatten()[: n // 10] for c in range(10)])
    return preprocessed(model, images[picked.sort().values])


def cpu_name() -> str:
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
        return next(line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name:'))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def top1(logits: np.ndarray | torch.Tensor, targets: torch.Tensor) -> float:
    return round(float((torch.as_tensor(logits).argmax(-1) == targets).float().mean()) * 100, 2)


def measure(name: str, data: str, n_calibration: int, limit: int | None) -> dict:
    model = timm.create_model(name, pretrained=True).eval()
    images, targets = load_fashion_mnist(data, train=False)
    images, targets = images[:limit], targets[:limit]
    x = preprocessed(model, images)
    with torch.inference_mode():
        row: dict = {'model': name, 'images': len(x), 'pytorch_fp32': top1(model(x), targets)}
    calibration = calibration_set(model, data, n_calibration)
    with tempfile.TemporaryDirectory() as work:
        path = export_onnx(model, Path(work) / 'fp32.onnx')
        row['onnxruntime_fp32'] = top1(OnnxClassifier(path)(x), targets)
        for method in INT8_METHODS:
            path = export_onnx(
                model, Path(work) / f'{method}.onnx', quantize='int8', int8_method=method, calibration=calibration
            )
            row[f'int8_{method}'] = top1(OnnxClassifier(path)(x), targets)
            row[f'int8_{method}_bytes'] = path.stat().st_size
        row['fp32_bytes'] = (Path(work) / 'fp32.onnx').stat().st_size
    for method in INT8_METHODS:
        row[f'int8_{method}_holds'] = row['onnxruntime_fp32'] - row[f'int8_{method}'] <= TOLERANCE
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', required=True, help='folder with the Fashion-MNIST release *-ubyte.gz files')
    parser.add_argument('--out', help='folder for results.json and results.md')
    parser.add_argument('--models', nargs='*', default=sorted(smallvit.PRETRAINED))
    parser.add_argument('--calibration', type=int, default=1000, help='training images for static calibration')
    parser.add_argument('--limit', type=int, help='only the first N test images (a quick check)')
    args = parser.parse_args()
    rows = [measure(name, args.data, args.calibration, args.limit) for name in args.models]
    header = '| model | test images | PyTorch fp32 | onnxruntime fp32 | int8 dynamic | int8 static |'
    lines = [header, '|---|---|---|---|---|---|']
    for r in rows:
        cells = [f'{r["int8_" + m]:.2f}' + ('' if r[f'int8_{m}_holds'] else ' (lost > 0.3)') for m in INT8_METHODS]
        lines.append(
            f'| {r["model"]} | {r["images"]} | {r["pytorch_fp32"]:.2f} | {r["onnxruntime_fp32"]:.2f} | '
            + ' | '.join(cells)
            + ' |'
        )
    import onnxruntime

    env = (
        f'timm-smallvit {timm_smallvit.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, '
        f'CPU: {cpu_name()}; calibration: {args.calibration} training images'
    )
    table = '\n'.join(lines)
    print(table)
    print(env)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / 'results.json').write_text(json.dumps({'rows': rows, 'environment': env}, indent=2) + '\n')
        (out / 'results.md').write_text(f'Top-1 (%), Fashion-MNIST test\n\n{table}\n\n{env}\n')


if __name__ == '__main__':
    main()
