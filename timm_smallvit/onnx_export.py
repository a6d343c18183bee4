"""ONNX: export a smallvit model to a checked, self-describing file, quantize it to int8, and run it with onnxruntime.

    export_onnx        model -> ``.onnx``: the model's own input (channels and size from its pretrained_cfg), a dynamic
                       batch axis, eval mode; ``onnx.checker`` and an onnxruntime run against the PyTorch logits pass
                       before the file is moved into place; the metadata says how to preprocess and label
    quantize_onnx      float ``.onnx`` -> int8: dynamic (MatMul/Gemm weights) or static (also the conv stem and the
                       activations, calibrated on images)
    OnnxClassifier     an ``.onnx`` file written here -> logits, and ``smallvit predict``'s records for image files,
                       preprocessed and labelled from the file's own metadata, checked (:mod:`timm_smallvit.onnx_file`)

The metadata (``metadata_props``, each value JSON) carries what timm's eval transform needs (``input_size``,
``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``), the ``architecture`` and the ``label_names``: a user
with only the ``.onnx`` file preprocesses and labels as ``smallvit predict`` does. They are checked before they are
written, as every reader checks them (:mod:`timm_smallvit.preprocess`). The work happens in
``smallvit-onnx-<pid>-*`` folders of the temp dir; each export removes those that killed runs left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from timm.utils.onnx import onnx_export

from ._files import check_writable_folder, remove_stale_folders, write_atomically
from .onnx_file import (
    INPUT_NAME,
    INT8_TOLERANCE,
    LOGITS_ATOL,
    LOGITS_RTOL,
    METADATA_KEYS,
    OUTPUT_NAME,
    check_onnx_output,
    open_session,
    read_metadata,
)
from .predict import READ_ERRORS, read_image, unreadable_reason
from .preprocess import DATA_KEYS, check_data_config, check_label_names, to_model_mode

__all__ = [
    'INPUT_NAME',
    'INT8_METHODS',
    'INT8_TOLERANCE',
    'LOGITS_ATOL',
    'LOGITS_RTOL',
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

# what `--quantize` takes; 'int8' is the method measured to hold top-1 within 0.3 points on both shipped weights
# (docs/deploy.md): dynamic quantization of the MatMul/Gemm weights, the conv stem kept in float
QUANTIZE_MODES = ('int8',)
INT8_METHODS = ('dynamic', 'static')
DEFAULT_INT8_METHOD = 'dynamic'
CHECK_BATCH = 3  # the check batch differs from the traced one (2): the batch axis is seen to be dynamic
# the work folders in the temp dir, named with the pid so that the next export removes what a killed one left
_WORK_NAME = re.compile(r'smallvit-(?:onnx|quant)-(?:(?P<pid>\d+)-)?[a-z0-9_]{8}')
_ANY_FILE = re.compile(r'.+')
_STALE_AFTER_S = 60 * 60  # a work folder without a pid (older versions) is left alone for this long


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

    They are checked as readers check them (:mod:`timm_smallvit.preprocess`): what would be refused is not written.

    Args:
        model: A timm model with a ``pretrained_cfg`` (label_names, when it has them, label the classes).
    """
    cfg: dict[str, Any] = getattr(model, 'pretrained_cfg', None) or {}
    architecture = cfg.get('architecture') or type(model).__name__
    source = f"{architecture}'s pretrained_cfg"
    data_config = resolve_model_data_config(model)
    patch_embed = getattr(model, 'patch_embed', None)
    built_for = None if getattr(model, 'dynamic_img_size', False) else getattr(patch_embed, 'img_size', None)
    in_chans = getattr(model, 'in_chans', None)
    check_data_config(data_config, source=source, in_chans=in_chans, img_size=built_for)
    labels = check_label_names(cfg.get('label_names'), source=source, num_classes=getattr(model, 'num_classes', 0))
    values: dict[str, Any] = {
        'architecture': architecture,
        'label_names': labels,
        **{k: data_config[k] for k in DATA_KEYS},
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
    check_writable_folder(folder, path)
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
    metadata = onnx_metadata(model)  # checked first: nothing is exported that predict would refuse
    input_size = tuple(resolve_model_data_config(model)['input_size'])
    was_training = model.training
    model.eval()
    _remove_stale_work()
    try:
        with _quiet_exporters(), _work_folder('onnx') as work:
            staged = Path(work) / 'model.onnx'
            _export_float(model, staged, input_size)
            _set_metadata(staged, metadata)
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
            open_session(staged, read_metadata(staged, str(path)), source=str(path))  # as every reader opens it
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


def _work_folder(kind: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f'smallvit-{kind}-{os.getpid()}-')


def _remove_stale_work() -> None:
    """Remove the work folders (empty or not) that killed exports and quantizations left in the temp dir."""
    remove_stale_folders(tempfile.gettempdir(), _WORK_NAME, _ANY_FILE, _STALE_AFTER_S)


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

    _remove_stale_work()
    with _work_folder('quant') as work:
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


class OnnxClassifier:
    """An ``.onnx`` file written by :func:`export_onnx`, run with onnxruntime, preprocessed and labelled from its
    metadata as ``smallvit predict`` does for a PyTorch model (timm's eval transform, the same image mode).

    Args:
        path: The ``.onnx`` file.
        threads: onnxruntime's intra-op threads (default: its own choice).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        meta = read_metadata(self.path)  # checked: the graph's input and output, the preprocessing, the labels
        self.architecture: str = meta['architecture']
        self.data_config: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()
                                            if k in DATA_KEYS}  # fmt: skip
        self.session = open_session(self.path, meta, threads)
        self.num_classes = int(self.session.get_outputs()[0].shape[-1])
        self.label_names: list[str] = meta['label_names'] or [str(i) for i in range(self.num_classes)]
        self.transform = create_transform(**self.data_config)
        self.mode = 'L' if self.data_config['input_size'][0] == 1 else 'RGB'

    def __call__(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Logits ``(B, num_classes)`` for a preprocessed batch ``(B, C, H, W)``."""
        array = x.numpy() if isinstance(x, torch.Tensor) else x
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(array, dtype=np.float32)})[0]

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> the model's input batch (converted to its mode as training converts, then timm's eval
        transform)."""
        return torch.stack([self.transform(to_model_mode(img, self.mode)) for img in images])

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
                    img, original = read_image(path, self.mode)
                except READ_ERRORS as e:
                    records.append({'file': str(path), 'error': unreadable_reason(e)})
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
