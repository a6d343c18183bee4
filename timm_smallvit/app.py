"""``smallvit app``: see what a model sees, in a browser: a Gradio Blocks app over smallvit models and ONNX files.

    AppModel        one model reference (anything ``smallvit predict`` takes), loaded once: how it reads an image,
                    its labels, its attention extractor, its card facts
    build_app       the Blocks app: an image (upload, paste, an example, or a drawing on the sketchpad), the top-k
                    labels, the last block's attention and the rollout over the image with an opacity control, a model
                    picker and the model's card facts; endpoints ``/predict`` (an image) and ``/predict_drawing``
    launch          build_app served on 127.0.0.1 by default, offline: no share link, no analytics or version check,
                    no file served but the app's own, an upload limit, a queue with a concurrency limit

Probabilities are those of ``smallvit predict`` for the same file: the same loader (:func:`predict.load_model`, or
:class:`onnx_export.OnnxClassifier` for ``.onnx`` files), the same conversion to the model's channels and timm's
eval transform from the model's own data config. Gradio is the ``app`` extra: this module imports it, so import it
only where the app is wanted.
"""

from __future__ import annotations

import copy
import math
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from huggingface_hub import ModelCard
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_model_data_config

from .attention import PooledAttention
from .onnx_export import OnnxClassifier
from .plots import ATTENTION_OPACITY, attention_overlay
from .predict import load_model
from .preprocess import to_model_mode
from .smallvit import PRETRAINED

__all__ = ['DEFAULT_MODELS', 'EXAMPLES_DIR', 'MAX_FILE_SIZE', 'AppModel', 'build_app', 'launch', 'serve']

DEFAULT_MODELS = tuple(PRETRAINED)  # the shipped weights
EXAMPLES_DIR = Path(__file__).resolve().parent / 'examples'  # Fashion-MNIST test images (scripts/app_examples.py)
MAX_FILE_SIZE = '10mb'  # Gradio refuses larger uploads before they reach the app
CONCURRENCY = 2  # requests run at once (more queue): each forward already uses every core
# What the app decodes: the formats people photograph and draw in. Pillow's rarer decoders (TIFF, PSD, FITS, EPS, ...)
# are where most of its advisories were, and a web app takes files from anyone.
FORMATS = ('PNG', 'JPEG', 'WEBP', 'BMP', 'GIF')
MIN_SIDE = 8  # px: below this an image resized to 28 px is a few flat blocks, nothing to classify
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's own decompression-bomb bound (89.5 megapixels)
SHOW_SIDE = 280  # px: small images are drawn this large (one cell a pixel), large ones shrunk to it
DRAWING_CANVAS = (280, 280)
MAX_LAYERS = 16  # a sketchpad's; each is a whole image to decode
# a 28 px image is shown large, its pixels square (as the model sees them), not blurred
CSS = '.smallvit-pixels img {image-rendering: pixelated; min-width: 60%; object-fit: contain}'


@dataclass
class AppModel:
    """One model, loaded once for the app's lifetime.

    Args:
        ref: The reference it was loaded from.
        mode: The image mode it takes ('L' or 'RGB').
        input_size: (channels, height, width).
        transform: timm's eval transform from its data config (PIL image -> tensor).
        logits: Preprocessed batch -> logits.
        labels: Class names, by index.
        attention: (last block, rollout) maps for a preprocessed batch; None for ONNX files.
        pooled_by_token: The model pools its class token (names the last-block panel).
        facts: The card facts shown beside the image (Markdown).
    """

    ref: str
    mode: str
    input_size: tuple[int, int, int]
    transform: Callable[[Image.Image], torch.Tensor]
    logits: Callable[[torch.Tensor], torch.Tensor]
    labels: list[str]
    attention: PooledAttention | None
    pooled_by_token: bool
    facts: str

    @classmethod
    def load(cls, ref: str) -> AppModel:
        """Load what ``smallvit predict`` would load for ``ref``; a one-line error when it does not resolve."""
        if ref.lower().endswith('.onnx'):
            return cls._load_onnx(ref)
        model = load_model(ref)
        # attention is read on the explicit attention path: a twin keeps it, so the classifier is predict's own
        # model and no request switches a path another is running on
        twin = copy.deepcopy(model)
        twin.set_fused_attn(False)
        cfg = model.pretrained_cfg
        labels = list(cfg.get('label_names') or [str(i) for i in range(model.num_classes)])
        size = tuple(resolve_model_data_config(model)['input_size'])
        params = sum(p.numel() for p in model.parameters())
        facts = _facts(ref, cfg.get('architecture', ''), size, len(labels), params, _card_top1(ref, cfg))

        def logits(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(x)

        return cls(
            ref=ref,
            mode='L' if size[0] == 1 else 'RGB',
            input_size=size,
            transform=create_transform(**resolve_model_data_config(model)),
            logits=logits,
            labels=labels,
            attention=PooledAttention(twin),
            pooled_by_token=model.global_pool == 'token',
            facts=facts,
        )

    @classmethod
    def _load_onnx(cls, ref: str) -> AppModel:
        onnx = OnnxClassifier(ref)
        size = tuple(onnx.data_config['input_size'])
        facts = (
            _facts(ref, onnx.architecture, size, onnx.num_classes, None, None) + ' · ONNX: labels only, no attention'
        )
        return cls(
            ref=ref,
            mode=onnx.mode,
            input_size=size,
            transform=onnx.transform,
            logits=lambda x: torch.from_numpy(onnx(x)),
            labels=onnx.label_names,
            attention=None,
            pooled_by_token=False,
            facts=facts,
        )

    def classify(
        self, image: Image.Image, top_k: int = 5, attention: bool = True, opacity: float = ATTENTION_OPACITY
    ) -> tuple[dict[str, float], Image.Image | None, Image.Image | None]:
        """Top-k {label: probability}, and the last block's attention and the rollout over the image (or None).

        Args:
            image: In the model's mode (see :func:`~timm_smallvit.preprocess.to_model_mode`).
            top_k: Labels returned (1 to the number of classes).
            attention: Draw the attention maps (PyTorch models only).
            opacity: Of the maps over the image, 0-1.
        """
        x = self.transform(image)[None]
        probs = self.logits(x).float().softmax(dim=-1)[0]
        values, indices = probs.topk(max(1, min(int(top_k), len(self.labels))))
        confidences = {self.labels[i]: v for v, i in zip(values.tolist(), indices.tolist(), strict=True)}
        if not attention or self.attention is None:
            return confidences, None, None
        last, rollout = self.attention(x)
        size = _display_size(image.size)
        opacity = min(max(float(opacity), 0.0), 1.0)
        return (
            confidences,
            attention_overlay(image, last[0], opacity, size),
            attention_overlay(image, rollout[0], opacity, size),
        )


def _facts(ref: str, arch: str, size: tuple, classes: int, params: int | None, top1: str | None) -> str:
    parts = [f'**{_markdown_text(ref)}**']
    if arch and arch != ref.split('.')[0]:
        parts.append(f'`{_markdown_text(arch)}`')
    if params is not None:
        parts.append(f'{params:,} parameters')
    parts.append('input ' + '×'.join(str(int(s)) for s in size))
    parts.append(f'{classes} classes')
    if top1:
        parts.append(top1)
    return ' · '.join(parts)


def _markdown_text(text: str) -> str:
    # a name from a file or the command line is shown as text, never as Markdown or HTML
    return ''.join(f'\\{c}' if c in '\\`*_[]<>|' else c for c in str(text) if c.isprintable())


def _card_top1(ref: str, cfg: dict[str, Any]) -> str | None:
    """'test top-1 93.75% (Fashion-MNIST)' from the model card's model-index, when the model has a card."""
    card_path = None
    if cfg.get('file'):  # shipped weights: the card beside them
        card_path = Path(cfg['file']).parent / 'README.md'
    elif ref.startswith('local-dir:') or Path(ref).is_dir():
        card_path = Path(ref.removeprefix('local-dir:')) / 'README.md'
    elif ref.startswith('hf-hub:'):
        from huggingface_hub import hf_hub_download
        from timm.models import parse_model_name

        try:
            _, repo = parse_model_name(ref)
            repo_id, _, revision = repo.partition('@')
            card_path = Path(hf_hub_download(repo_id, 'README.md', revision=revision or None))
        except Exception:  # a repo without a card: no number to show
            return None
    if card_path is None or not card_path.is_file():
        return None
    try:
        results = ModelCard.load(card_path).data.eval_results or []
    except Exception:  # an unreadable card: no number to show
        return None
    for result in results:
        if result.metric_type == 'accuracy' and isinstance(result.metric_value, (int, float)):
            where = result.dataset_name or 'test'
            return f'test top-1 {float(result.metric_value):.2f}% ({_markdown_text(where)}, from its model card)'
    return None


def _display_size(size: tuple[int, int]) -> tuple[int, int]:
    w, h = size
    scale = SHOW_SIDE / max(w, h)
    if scale >= 1:  # whole pixels, so that one cell stays one patch
        scale = math.floor(scale)
    return max(1, round(w * scale)), max(1, round(h * scale))


# ---- reading what the browser sends ---------------------------------------------------------------------------------


def _error(message: str, title: str = 'Error') -> gr.Error:
    # what the page shows; an expected refusal is no reason for a traceback in the terminal
    return gr.Error(message, title=title, print_exception=False)


def _path_of(value: Any, what: str) -> Path:
    # the payload of an upload (preprocess=False): Gradio has checked that the file is in its upload folder
    path = value.get('path') if isinstance(value, dict) else value
    if not path:
        raise _error(f'No {what}: upload, paste or pick an image first.', title='No image')
    return Path(path)


def _open(path: Path, name: str) -> Image.Image:
    """The image at path, decoded, with a one-line gr.Error for anything that is not a small enough image."""
    try:
        with Image.open(path, formats=FORMATS) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise _error(
                    f'{name}: {w}×{h} pixels is over the {MAX_PIXELS:,}-pixel limit (a decompression bomb?): '
                    'send a smaller image.',
                    title='Image too large',
                )
            if min(w, h) < MIN_SIDE:
                raise _error(
                    f'{name}: {w}×{h} pixels is too small to classify: give one at least {MIN_SIDE} pixels a side.',
                    title='Image too small',
                )
            img.load()
            return img.copy()
    except gr.Error:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        reason = 'not an image' if isinstance(e, UnidentifiedImageError) else ' '.join(str(e).split())
        raise _error(
            f'{name}: cannot read it as an image ({reason}). The app reads {", ".join(FORMATS)} files.',
            title='Not an image',
        ) from None


def _drawing_image(value: Any, mode: str, size: tuple[int, int]) -> Image.Image:
    """A sketchpad drawing as the model's training images look: the strokes cropped, centred and resized to the input.

    The strokes are read from the layers' alpha, not the composite (a black brush on a dark canvas would be all zeros
    there): a grayscale model gets them light on black, as Fashion-MNIST draws objects; an RGB model gets their
    colours on white.
    """
    layers = value.get('layers') if isinstance(value, dict) else None
    if layers and len(layers) > MAX_LAYERS:
        raise _error(f'The drawing has {len(layers)} layers: the app reads at most {MAX_LAYERS}.', title='Bad drawing')
    alpha: np.ndarray | None = None
    colour = None
    for i, layer in enumerate(layers or []):
        rgba = _open(_path_of(layer, 'drawing'), f'drawing layer {i + 1}').convert('RGBA')
        if alpha is not None and rgba.size != (alpha.shape[1], alpha.shape[0]):
            raise _error("The drawing's layers differ in size: draw on one canvas.", title='Bad drawing')
        a = np.asarray(rgba)[..., 3]
        alpha = a if alpha is None else np.maximum(alpha, a)
        colour = rgba if colour is None else Image.alpha_composite(colour, rgba)
    if alpha is None or colour is None or not alpha.any():
        raise _error('The sketchpad is empty: draw an object on it first.', title='Empty drawing')
    strokes = (
        Image.fromarray(alpha)
        if mode == 'L'
        else Image.alpha_composite(Image.new('RGBA', colour.size, 'white'), colour)
    )
    box = Image.fromarray(alpha).getbbox()
    strokes = strokes.crop(box).convert(mode)
    # pad to the input's shape, centred, with the background, then shrink by area (BOX): strokes keep their weight
    h, w = size
    bw, bh = strokes.size
    side_w, side_h = max(bw, math.ceil(bh * w / h)), max(bh, math.ceil(bw * h / w))
    canvas = Image.new(mode, (side_w, side_h), 0 if mode == 'L' else 'white')
    canvas.paste(strokes, ((side_w - bw) // 2, (side_h - bh) // 2))
    return canvas.resize((w, h), Image.Resampling.BOX)


def _shown_name(value: Any, fallback: str) -> str:
    # the browser's file name, for messages: printable, no markup, not endless
    name = value.get('orig_name') if isinstance(value, dict) else None
    name = ''.join(c for c in str(name or fallback) if c.isprintable() and c not in '<>&')
    return name[:80] or fallback


# ---- the app --------------------------------------------------------------------------------------------------------


def build_app(models: Sequence[str | AppModel] = DEFAULT_MODELS, examples: Sequence[Path] | None = None) -> gr.Blocks:
    """The Blocks app over ``models`` (each loaded once, here): see the module docstring.

    Args:
        models: References (anything ``smallvit predict`` takes, or an ``.onnx`` file) or loaded AppModels; the first
            is the one shown first.
        examples: Example images for the gallery; default: the Fashion-MNIST test images shipped in EXAMPLES_DIR.
    """
    if not models:
        raise ValueError('smallvit app: give at least one model.')
    loaded = {m.ref: m for m in (m if isinstance(m, AppModel) else AppModel.load(m) for m in models)}
    first = next(iter(loaded))
    examples = sorted(EXAMPLES_DIR.glob('*.png')) if examples is None else list(examples)
    most = max(len(m.labels) for m in loaded.values())

    def pick(name: str) -> AppModel:
        if name not in loaded:
            raise _error(f'model {_markdown_text(name)!r}: not one this app serves ({", ".join(loaded)}).')
        return loaded[name]

    def predict(
        image: Any, model: str = first, top_k: int = 5, attention: bool = True, opacity: float = ATTENTION_OPACITY
    ) -> tuple[dict[str, float], Image.Image | None, Image.Image | None]:
        entry = pick(model)
        if not image:  # the image was cleared: nothing to show
            return {}, None, None
        name = _shown_name(image, 'the image')
        img = _open(_path_of(image, 'image'), name)
        if img.mode not in (entry.mode, 'P', '1'):
            gr.Warning(
                f'{name}: a {img.mode} image, converted to {entry.mode} (the model takes {entry.input_size[0]} '
                f'channel{"s" if entry.input_size[0] > 1 else ""}).'
            )
        return entry.classify(to_model_mode(img, entry.mode), top_k, attention, opacity)

    def predict_drawing(
        drawing: Any, model: str = first, top_k: int = 5, attention: bool = True, opacity: float = ATTENTION_OPACITY
    ) -> tuple[dict[str, float], Image.Image | None, Image.Image | None]:
        entry = pick(model)
        img = _drawing_image(drawing, entry.mode, entry.input_size[1:])
        return entry.classify(img, top_k, attention, opacity)

    with gr.Blocks(title='smallvit: what the model sees', analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            '## What the model sees\n'
            'Upload or paste an image, pick an example, or draw on the sketchpad: the top labels, and where the model '
            "looks (its last block's attention and the attention rollout across blocks, over the image)."
        )
        with gr.Row():
            with gr.Column():
                picker = gr.Dropdown(list(loaded), value=first, label='Model', interactive=len(loaded) > 1)
                facts = gr.Markdown(loaded[first].facts)
                with gr.Tab('Image'):
                    image = gr.Image(
                        label='Image',
                        sources=['upload', 'clipboard'],
                        type='filepath',
                        height=300,
                        buttons=['fullscreen'],
                        elem_classes=['smallvit-pixels'],
                    )
                    if examples:
                        gr.Examples(
                            [[str(p)] for p in examples],
                            inputs=[image],
                            label='Fashion-MNIST test images (MIT licence, Zalando Research)',
                            examples_per_page=len(examples),
                        )
                with gr.Tab('Draw'):
                    drawing = gr.Sketchpad(
                        label='Draw an object', canvas_size=DRAWING_CANVAS, type='filepath', buttons=['fullscreen']
                    )
                    draw = gr.Button('Classify the drawing', variant='primary')
            with gr.Column():
                labels = gr.Label(label='Top labels')
                with gr.Row():
                    top_k = gr.Slider(1, most, value=min(5, most), step=1, label='Labels shown')
                    show = gr.Checkbox(value=True, label='Attention maps')
                    opacity = gr.Slider(0, 1, value=ATTENTION_OPACITY, step=0.05, label='Opacity of the maps')
                with gr.Row():
                    shown = {
                        'type': 'pil',
                        'format': 'png',
                        'interactive': False,
                        'buttons': ['download', 'fullscreen'],
                    }
                    last = gr.Image(label="Last block's attention", elem_id='smallvit-last', **shown)  # type: ignore[arg-type]
                    rollout = gr.Image(label='Attention rollout', elem_id='smallvit-rollout', **shown)  # type: ignore[arg-type]
        settings = [picker, top_k, show, opacity]
        outputs = [labels, last, rollout]
        gr.on(
            [image.change, picker.change, top_k.release, show.change, opacity.release],
            predict,
            [image, *settings],
            outputs,
            api_name='predict',
            preprocess=False,  # the app reads the upload itself: its own errors, and only FORMATS decoded
            trigger_mode='always_last',
        )
        draw.click(predict_drawing, [drawing, *settings], outputs, api_name='predict_drawing', preprocess=False)
        picker.change(lambda name: pick(name).facts, picker, facts, api_visibility='private', preprocess=False)
    return demo


def check_port(host: str, port: int) -> None:
    """A one-line OSError when host:port cannot be listened on (in use, or not this machine's address)."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(
                f'--host {host} --port {port}: cannot listen there ({e.strerror or e}): pick another --port.'
            ) from None


def serve(demo: gr.Blocks, host: str = '127.0.0.1', port: int = 7860, *, block: bool = True) -> str:
    """Serve the app with Gradio, offline and safe (see the module docstring); returns its URL.

    Args:
        demo: From build_app.
        host: The address to listen on: 127.0.0.1 (this machine only) unless you mean to share it.
        port: The port.
        block: Serve until interrupted (False: return once it listens, for tests and notebooks).
    """
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    os.environ['GRADIO_ANALYTICS_ENABLED'] = 'False'  # what Gradio's launch reads besides analytics_enabled
    # on a loopback address, only requests for it: a web page that rebinds its own name to 127.0.0.1 gets nothing
    loopback = host in ('127.0.0.1', 'localhost', '::1')
    hosts = ['127.0.0.1', 'localhost', '[::1]'] if loopback else ['*']
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=64)
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        quiet=True,
        show_error=False,  # tracebacks stay in the terminal; the page gets the gr.Error messages
        max_file_size=MAX_FILE_SIZE,
        allowed_paths=[],
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        enable_monitoring=False,
        run_history=False,
        footer_links=['api'],
        css=CSS,
        app_kwargs={'middleware': [Middleware(TrustedHostMiddleware, allowed_hosts=hosts)]},
    )
    return url


def launch(models: Sequence[str] = DEFAULT_MODELS, host: str | None = None, port: int | None = None) -> None:
    """Load the models and serve the app until interrupted (what ``smallvit app`` and a Space's app.py call).

    Args:
        models: Model references; default: the shipped pretrained tags.
        host: Default: $GRADIO_SERVER_NAME (Spaces set it), else 127.0.0.1.
        port: Default: $GRADIO_SERVER_PORT, else 7860.
    """
    host = host or os.environ.get('GRADIO_SERVER_NAME') or '127.0.0.1'
    port = port or int(os.environ.get('GRADIO_SERVER_PORT') or 7860)
    check_port(host, port)  # before the models load: a busy port costs nothing
    demo = build_app(models)
    print(f'smallvit app: serving {", ".join(models)} on http://{host}:{port} (Ctrl+C to stop)', flush=True)
    serve(demo, host, port, block=True)
