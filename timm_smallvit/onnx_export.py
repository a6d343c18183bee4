"""ONNX: export a smallvit model to a checked, self-describing file, quantize it to int8, and run it with onnxruntime.

    export_onnx        model -> ``.onnx``: the model's own input (channels and size from its pretrained_cfg), a dynamic
                       batch axis, eval mode; ``onnx.checker`` and an onnxruntime run against the PyTorch logits pass
                       before the file is moved into place; the metadata says how to preprocess and label
    quantize_onnx      float ``.onnx`` -> int8: dynamic (MatMul/Gemm weights) or static (also the conv stem and the
                       activations, calibrated on images)
    OnnxClassifier     an ``.onnx`` file written here -> logits, and ``smallvit predict``'s records for image files,
                       preprocessed and labelled from the file's own metadata

The metadata (``metadata_props``, each value JSON) carries what timm's eval transform needs (``input_size``,
``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``), the ``architecture`` and the ``label_names``: a user
with only the ``.onnx`` file preprocesses and labels as ``smallvit predict`` does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_model_data_config
from timm.utils.onnx import onnx_export

from ._files import write_atomically

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    'INPUT_NAME',
    'INT8_METHODS',
    'METADATA_KEYS',
    'OUTPUT_NAME',
    'QUANTIZE_MODES',
    'OnnxClassifier',
    'check_onnx_output',
    'check_output_path',
    'export_onnx',
    'onnx_metadata',
    'quantize_onnx',
    'read_metadata',
]

_logger = logging.getLogger(__name__)

INPUT_NAME = 'pixel_values'  # transformers' name for the same tensor
OUTPUT_NAME = 'logits'
# what `--quantize` takes; 'int8' is the method measured to hold top-1 within 0.3 points on both shipped weights
# (docs/deploy.md): dynamic quantization of the MatMul/Gemm weights, the conv stem kept in float
QUANTIZE_MODES = ('int8',)
INT8_METHODS = ('dynamic', 'static')
DEFAULT_INT8_METHOD = 'dynamic'
# float export: onnxruntime's logits against PyTorch's, elementwise |ort - torch| <= ATOL + RTOL * |torch| (measured:
# about 3e-6 on the shipped weights, ~1e-7 relative)
LOGITS_ATOL = 1e-4
LOGITS_RTOL = 1e-4
# int8: logits move by quantization, so the check is that they stay close to the float model's, relative to their
# spread: max |int8 - float| <= INT8_TOLERANCE * (max - min of the float logits) over the check batch
INT8_TOLERANCE = 0.1
CHECK_BATCH = 3  # the check batch differs from the traced one (2): the batch axis is seen to be dynamic
METADATA_KEYS = ('architecture', 'label_names', 'input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


# the exporter's and quantizer's notes (each rewrite, folded constant, tensor left in float: ~160 lines at INFO), of
# no use to the user; onnxruntime's quantizer logs through the root logger
_NOISY_LOGGERS = ('onnxscript', 'onnx_ir', 'torch.onnx', 'torch.export', 'torch._dynamo', 'torch.fx', '')


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def onnx_metadata(model: torch.nn.Module) -> dict[str, str]:
    """The metadata an exported file carries: timm's data config, the architecture and label names, as JSON strings.

    Args:
        model: A timm model with a ``pretrained_cfg`` (label_names, when it has them, label the classes).
    """
    cfg: dict[str, Any] = getattr(model, 'pretrained_cfg', None) or {}
    data_config = resolve_model_data_config(model)
    labels = cfg.get('label_names')
    values: dict[str, Any] = {
        'architecture': cfg.get('architecture') or type(model).__name__,
        'label_names': list(labels) if labels else None,
        **{k: data_config[k] for k in METADATA_KEYS[2:]},
    }
    return {k: json.dumps(list(v) if isinstance(v, tuple) else v) for k, v in values.items()}


def check_output_path(out: str | os.PathLike, overwrite: bool) -> Path:
    """``out`` as a Path; a one-line error, before any work, for an OUT that cannot or must not be written.

    Args:
        out: The ``.onnx`` file to write.
        overwrite: Whether an existing file may be replaced.
    """
    path = Path(out)
    if path.is_dir():
        raise IsADirectoryError(f'{path}: is a folder; name the .onnx file to write.')
    if path.suffix.lower() != '.onnx':
        raise ValueError(f'{path}: the output file name must end in .onnx.')
    if path.exists() and not overwrite:
        raise FileExistsError(f'{path}: exists; pass --overwrite (overwrite=True) to replace it.')
    folder = path.parent
    while not folder.exists():  # the folders to create: the nearest existing one must take them
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f'{path}: {folder} is a file, not a folder.')
    try:  # a real probe: access() says yes to root even where the file system refuses
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PermissionError(f'{path}: cannot write in {folder} ({e.strerror or e}).') from None
    return path


def export_onnx(
    model: torch.nn.Module,
    out: str | os.PathLike,
    *,
    quantize: str | None = None,
    int8_method: str = DEFAULT_INT8_METHOD,
    calibration: torch.Tensor | None = None,
    overwrite: bool = False,
) -> Path:
    """Export ``model`` to ``out`` (``.onnx``), checked against PyTorch before it is moved into place.

    The graph takes the model's own input, ``(batch, *pretrained_cfg input_size)`` named ``pixel_values``, with a
    dynamic batch axis, and returns ``logits``; the model is exported in eval mode (its own mode is restored).

    Args:
        model: A smallvit (or any timm) model with a pretrained_cfg.
        out: The ``.onnx`` file to write (its folder is created if needed).
        quantize: None for float32, or 'int8' (see ``int8_method``).
        int8_method: 'dynamic' (MatMul/Gemm weights, no data needed) or 'static' (also the convolutions and the
            activations, calibrated on ``calibration``).
        calibration: Preprocessed images ``(N, C, H, W)``: static quantization's calibration set, and the int8 check
            batch (random inputs otherwise).
        overwrite: Replace an existing ``out``.
    """
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f'--quantize {quantize}: unknown mode; valid: {", ".join(QUANTIZE_MODES)}.')
    if int8_method not in INT8_METHODS:
        raise ValueError(f'int8 method {int8_method!r}: valid: {", ".join(INT8_METHODS)}.')
    if quantize and int8_method == 'static' and calibration is None:
        raise ValueError('static int8 quantization needs calibration images.')
    path = check_output_path(out, overwrite)
    input_size = tuple(resolve_model_data_config(model)['input_size'])
    was_training = model.training
    model.eval()
    try:
        with _quiet_exporters(), tempfile.TemporaryDirectory(prefix='smallvit-onnx-') as work:
            staged = Path(work) / 'model.onnx'
            _export_float(model, staged, input_size)
            _set_metadata(staged, onnx_metadata(model))
            generator = torch.Generator().manual_seed(0)
            x = torch.randn((CHECK_BATCH, *input_size), generator=generator)
            with torch.inference_mode():
                reference = model(x).float().numpy()
            check_onnx_output(staged, x.numpy(), reference)
            if quantize:
                float_path, staged = staged, Path(work) / 'model.int8.onnx'
                quantize_onnx(float_path, staged, method=int8_method, calibration=calibration)
                if calibration is not None:  # check int8 on real images when there are some
                    x = calibration[:64]
                    with torch.inference_mode():
                        reference = model(x).float().numpy()
                check_onnx_output(staged, x.numpy(), reference, int8=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda tmp: shutil.copyfile(staged, tmp))
    finally:
        model.train(was_training)
    return path


def _export_float(model: torch.nn.Module, path: Path, input_size: tuple[int, ...]) -> None:
    # timm's onnx_export with torch's dynamo exporter (torch.export): the TorchScript exporter it also offers is
    # deprecated since torch 2.9 and will be removed. timm's own check (full_check) runs here; the forward check is
    # ours (check_onnx_output: a stated tolerance, a batch size other than the traced one).
    example = torch.randn((2, *input_size), generator=torch.Generator().manual_seed(0))
    onnx_export(
        model,
        str(path),
        example_input=example,
        use_dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        check=True,
    )


def _set_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def check_onnx_output(path: str | os.PathLike, x: np.ndarray, reference: np.ndarray, int8: bool = False) -> None:
    """``onnx.checker``, then onnxruntime's logits for ``x`` against ``reference``; ValueError above the tolerance.

    Args:
        path: The ``.onnx`` file.
        x: An input batch.
        reference: PyTorch's logits for ``x``.
        int8: A quantized model (the INT8_TOLERANCE check instead of LOGITS_ATOL/LOGITS_RTOL).
    """
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    logits = _session(path).run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]
    if logits.shape != reference.shape:
        raise ValueError(f'{path}: onnxruntime returned logits of shape {logits.shape}, PyTorch {reference.shape}.')
    diff = float(np.abs(logits - reference).max())
    if int8:
        spread = float(reference.max() - reference.min())
        if not diff <= INT8_TOLERANCE * spread:
            raise ValueError(
                f'{path}: int8 logits differ from the float model by up to {diff:.3g}, over '
                f'{INT8_TOLERANCE} of their range ({spread:.3g}).'
            )
    elif not np.allclose(logits, reference, rtol=LOGITS_RTOL, atol=LOGITS_ATOL):
        raise ValueError(
            f'{path}: onnxruntime logits differ from PyTorch by up to {diff:.3g} (tolerance {LOGITS_ATOL} + '
            f'{LOGITS_RTOL} x |logit|).'
        )


def _session(path: str | os.PathLike, threads: int | None = None) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: the optimizer's notes are not the user's concern
    return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


class _Batches:
    """onnxruntime's CalibrationDataReader over a tensor of preprocessed images, a batch at a time."""

    def __init__(self, images: torch.Tensor, batch_size: int = 64) -> None:
        self.batches = iter(images[i : i + batch_size].numpy() for i in range(0, len(images), batch_size))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}


def quantize_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    method: str = DEFAULT_INT8_METHOD,
    calibration: torch.Tensor | None = None,
) -> None:
    """Quantize a float ``.onnx`` file to int8 with onnxruntime, keeping its metadata.

    Args:
        src: The float model.
        dst: The int8 model to write.
        method: 'dynamic': MatMul/Gemm weights in int8, activations quantized on the fly, convolutions left in float.
            'static': QDQ int8 for Conv, MatMul and Gemm, 7-bit weights per channel, activation ranges calibrated
            (MinMax) on ``calibration``.
        calibration: Preprocessed training images ``(N, C, H, W)`` for 'static'.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix='smallvit-quant-') as work:
        prepared = Path(work) / 'prepared.onnx'
        # onnxruntime's recommended step before quantizing: shape inference and graph optimization
        quant_pre_process(str(src), str(prepared))
        if method == 'dynamic':
            quantize_dynamic(prepared, dst, op_types_to_quantize=['MatMul', 'Gemm'], weight_type=QuantType.QInt8)
        elif method == 'static':
            if calibration is None:
                raise ValueError('static int8 quantization needs calibration images.')
            quantize_static(
                prepared,
                dst,
                _Batches(calibration),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=['Conv', 'MatMul', 'Gemm'],
                per_channel=True,
                # 7-bit weights: without VNNI (AVX2 only), onnxruntime's u8s8 kernels sum pairs of products in int16,
                # which saturates; with 8-bit weights the conv stem lost 6 points of top-1 (docs/deploy.md)
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        else:
            raise ValueError(f'int8 method {method!r}: valid: {", ".join(INT8_METHODS)}.')
    import onnx

    _set_metadata(Path(dst), {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props})


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an ``.onnx`` file written by :func:`export_onnx`, decoded; a one-line ValueError otherwise."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such file.')
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ValueError(f'{path}: not an ONNX model ({" ".join(str(e).split()) or type(e).__name__}).') from None
    if not proto.graph.node:
        raise ValueError(f'{path}: not an ONNX model (no graph).')
    props = {p.key: p.value for p in proto.metadata_props}
    missing = [k for k in METADATA_KEYS if k not in props]
    if missing:
        raise ValueError(
            f'{path}: an ONNX model without the preprocessing metadata (missing {", ".join(missing)}); '
            'export it with `smallvit onnx`.'
        )
    try:
        return {k: json.loads(props[k]) for k in METADATA_KEYS}
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: unreadable metadata ({e}).') from None


class OnnxClassifier:
    """An ``.onnx`` file written by :func:`export_onnx`, run with onnxruntime, preprocessed and labelled from its
    metadata as ``smallvit predict`` does for a PyTorch model (timm's eval transform, the same image mode).

    Args:
        path: The ``.onnx`` file.
        threads: onnxruntime's intra-op threads (default: its own choice).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        meta = read_metadata(self.path)
        self.architecture: str = meta['architecture']
        self.data_config: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in meta.items() if k in METADATA_KEYS[2:]
        }
        self.session = _session(self.path, threads)
        self.num_classes = int(self.session.get_outputs()[0].shape[-1])
        self.label_names: list[str] = meta['label_names'] or [str(i) for i in range(self.num_classes)]
        self.transform = create_transform(**self.data_config)
        self.mode = 'L' if self.data_config['input_size'][0] == 1 else 'RGB'

    def __call__(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Logits ``(B, num_classes)`` for a preprocessed batch ``(B, C, H, W)``."""
        array = x.numpy() if isinstance(x, torch.Tensor) else x
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(array, dtype=np.float32)})[0]

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> the model's input batch (converted to its mode, then timm's eval transform)."""
        return torch.stack([self.transform(img.convert(self.mode)) for img in images])

    def predict(self, paths: Iterable[Path], top_k: int = 5, batch_size: int = 64) -> list[dict[str, Any]]:
        """``smallvit predict``'s records: ``{'file', 'predictions': [{'label', 'index', 'probability'}]}`` or
        ``{'file', 'error'}`` per image, in order."""
        paths = list(paths)
        top_k = max(1, min(top_k, self.num_classes))
        records: list[dict[str, Any]] = []
        converted: set[str] = set()
        for start in range(0, len(paths), batch_size):
            slots, tensors = [], []
            for path in paths[start : start + batch_size]:
                try:
                    img, original = _read(path, self.mode)
                except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
                    records.append({'file': str(path), 'error': _reason(e)})
                    continue
                if original not in (self.mode, 'P', '1') and original not in converted:
                    converted.add(original)
                    chans = '1 channel (grayscale)' if self.mode == 'L' else '3 channels (RGB)'
                    _logger.warning('%s images are converted to %s: the model takes %s.', original, self.mode, chans)
                slots.append(len(records))
                records.append({'file': str(path)})
                tensors.append(self.transform(img))
            if not tensors:
                continue
            probs = torch.from_numpy(self(torch.stack(tensors))).float().softmax(dim=-1)
            values, indices = probs.topk(top_k, dim=-1)
            for slot, p, i in zip(slots, values.tolist(), indices.tolist(), strict=True):
                records[slot]['predictions'] = [
                    {'label': self.label_names[k], 'index': k, 'probability': round(v, 6)}
                    for v, k in zip(p, i, strict=True)
                ]
        return records


def _read(path: Path, mode: str) -> tuple[Image.Image, str]:
    with Image.open(path) as img:
        img.load()
        return img.convert(mode), img.mode


def _reason(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):
        return 'not an image Pillow can read'
    return ' '.join(str(e).split()) or type(e).__name__
