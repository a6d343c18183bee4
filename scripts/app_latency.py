"""A prediction's latency through `smallvit app`'s /predict endpoint, as a client sees it (docs/app.md).

    python scripts/app_latency.py [--requests 200] [--models smallvit_tiny_convstem_28.fmnist ...] [--threads N]

Serves the app in this process on a free 127.0.0.1 port (the models loaded once), then, for each model, with and
without the attention maps, sends the shipped example images one request at a time through gradio_client
(`Client(url).predict(handle_file(path), api_name='/predict')`: upload, queue, answer, and the maps' PNG files
downloaded) and prints p50 and p95 over --requests requests after a warm-up, with the CPU model and the thread count.
The first row is Gradio alone: the same upload to an endpoint that returns a fixed label at once (the floor under
any model). Run it on an idle machine to compare with the figures in docs/app.md.
"""

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import gradio as gr
import torch
from gradio_client import Client, handle_file

from timm_smallvit.app import DEFAULT_MODELS, EXAMPLES_DIR, build_app, serve


def cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method='inclusive')[q - 1] if len(values) > 1 else values[0]


def floor_app() -> gr.Blocks:
    """The same image input and queue as the app, answering a fixed label without reading the image."""
    with gr.Blocks(analytics_enabled=False) as demo:
        image = gr.Image(type='filepath')
        label = gr.Label()
        image.change(lambda _: {'floor': 1.0}, image, label, api_name='predict', preprocess=False)
    return demo


def measure(client: Client, examples: list[Path], count: int, warmup: int, **kwargs: object) -> tuple[float, float]:
    """p50 and p95 (ms) of count requests, one at a time, after warmup ones."""
    times = []
    for i in range(warmup + count):
        path = handle_file(examples[i % len(examples)])
        start = time.perf_counter()
        client.predict(path, api_name='/predict', **kwargs)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return percentile(times, 50), percentile(times, 95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--requests', type=int, default=200)
    parser.add_argument('--warmup', type=int, default=20)
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS))
    parser.add_argument('--threads', type=int, default=None, help="torch's intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault('GRADIO_TEMP_DIR', tempfile.mkdtemp(prefix='smallvit-latency-'))
    examples = sorted(EXAMPLES_DIR.glob('*.png'))
    downloads = os.path.join(os.environ['GRADIO_TEMP_DIR'], 'downloads')
    print(f'CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch threads {torch.get_num_threads()}')
    print(f'{args.requests} requests each, one at a time, after {args.warmup} warm-up requests (ms)')
    print(f'{"model":<36} {"attention":<10} {"p50":>7} {"p95":>7}')
    floor = floor_app()
    url = serve(floor, '127.0.0.1', free_port(), block=False)
    try:
        p50, p95 = measure(Client(url, verbose=False, download_files=downloads), examples, args.requests, args.warmup)
        print(f'{"(Gradio alone: a fixed label)":<36} {"-":<10} {p50:7.1f} {p95:7.1f}', flush=True)
    finally:
        floor.close()
    demo = build_app(args.models)
    url = serve(demo, '127.0.0.1', free_port(), block=False)
    client = Client(url, verbose=False, download_files=downloads)
    try:
        for model in args.models:
            for attention in (False, True):
                p50, p95 = measure(client, examples, args.requests, args.warmup, model=model, attention=attention)
                print(f'{model:<36} {"with" if attention else "without":<10} {p50:7.1f} {p95:7.1f}', flush=True)
    finally:
        demo.close()


if __name__ == '__main__':
    main()
