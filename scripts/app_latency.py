"""A prediction's latency through `smallvit app`'s /predict endpoint, as a client sees it (docs/app.md).

    python scripts/app_latency.py [--requests 200] [--models smallvit_tiny_convstem_28.fmnist ...] [--threads N]

Serves the app in this process on a free 127.0.0.1 port (the models loaded once), then, for each model, with and
without the attention maps, sends the shipped example images one request at a time, two ways, and prints p50 and p95
over --requests requests after a warm-up, with the CPU model and the thread count:

- http: Gradio's own HTTP API, as curl or a page's JavaScript calls it: the image uploaded (`POST
  /gradio_api/upload`), the call queued (`POST /gradio_api/call/predict`), its result read from the event stream
  (`GET /gradio_api/call/predict/<event_id>`), and the maps' PNG files fetched;
- gradio_client: `Client(url).predict(handle_file(path), api_name='/predict')`. gradio_client 2.7 reads the event
  stream by polling its message queue every 50 ms, so its times sit on a floor of about 2 x 50 ms that is the
  client's, not the app's.

The first rows are Gradio alone: the same upload to an endpoint that returns a fixed label at once (the floor under
any model). Run it on an idle machine to compare with the figures in docs/app.md.
"""

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import gradio as gr
import httpx
import torch
from gradio_client import Client, handle_file

from timm_smallvit.app import DEFAULT_MODELS, EXAMPLES_DIR, build_app, serve
from timm_smallvit.plots import ATTENTION_OPACITY


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


def http_predict(http: httpx.Client, url: str, path: Path, *settings: object) -> None:
    """One prediction through Gradio's HTTP API: upload, call, the result's event stream, the maps' files."""
    with path.open('rb') as f:
        (uploaded,) = http.post(f'{url}gradio_api/upload', files={'files': f}).raise_for_status().json()
    image = {'path': uploaded, 'meta': {'_type': 'gradio.FileData'}}
    call = http.post(f'{url}gradio_api/call/predict', json={'data': [image, *settings]}).raise_for_status()
    event = None
    with http.stream('GET', f'{url}gradio_api/call/predict/{call.json()["event_id"]}') as stream:
        for line in stream.iter_lines():
            if line.startswith('event: '):
                event = line[len('event: ') :]
            elif line.startswith('data: ') and event in ('complete', 'error'):
                if event == 'error':
                    raise RuntimeError(f'/predict answered an error: {line}')
                for output in json.loads(line[len('data: ') :]):
                    if isinstance(output, dict) and output.get('url'):  # an attention map's PNG
                        http.get(output['url']).raise_for_status()
                return
    raise RuntimeError('/predict: the event stream ended without a result')


def measure_http(url: str, examples: list[Path], count: int, warmup: int, *settings: object) -> tuple[float, float]:
    """p50 and p95 (ms) of count requests through the HTTP API, one at a time, after warmup ones."""
    times = []
    with httpx.Client(timeout=30) as http:
        for i in range(warmup + count):
            start = time.perf_counter()
            http_predict(http, url, examples[i % len(examples)], *settings)
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
    print(f'{"model":<36} {"attention":<10} {"via":<14} {"p50":>7} {"p95":>7}')

    def row(model: str, attention: str, via: str, p50: float, p95: float) -> None:
        print(f'{model:<36} {attention:<10} {via:<14} {p50:7.1f} {p95:7.1f}', flush=True)

    floor = floor_app()
    url = serve(floor, '127.0.0.1', free_port(), block=False)
    try:
        alone = '(Gradio alone: a fixed label)'
        row(alone, '-', 'http', *measure_http(url, examples, args.requests, args.warmup))
        client = Client(url, verbose=False, download_files=downloads)
        row(alone, '-', 'gradio_client', *measure(client, examples, args.requests, args.warmup))
    finally:
        floor.close()
    demo = build_app(args.models)
    url = serve(demo, '127.0.0.1', free_port(), block=False)
    client = Client(url, verbose=False, download_files=downloads)
    try:
        for model in args.models:
            for attention in (False, True):
                settings = (model, 5, attention, ATTENTION_OPACITY)  # /predict's parameters after the image
                shown = 'with' if attention else 'without'
                row(model, shown, 'http', *measure_http(url, examples, args.requests, args.warmup, *settings))
                times = measure(client, examples, args.requests, args.warmup, model=model, attention=attention)
                row(model, shown, 'gradio_client', *times)
    finally:
        demo.close()


if __name__ == '__main__':
    main()
