"""An ONNX file of a smallvit model, read and checked before anything trusts it.

    read_metadata        ``.onnx`` -> its metadata (the preprocessing, architecture and labels ``smallvit onnx``
                         writes), checked with :mod:`timm_smallvit.preprocess` against the graph's own input
                         ``(batch, C, H, W)`` and output ``(batch, classes)``
    open_session         an onnxruntime session that loads the file and runs one image to logits of the right shape
    check_onnx_output    onnx.checker, then onnxruntime's logits for a batch against PyTorch's
    check_onnx_matches   an export's ``model.onnx`` against its config.json and weights (what ``smallvit push`` checks)

Everything a file can get wrong is a ValueError of one line naming it: no graph, missing or mistyped metadata, a
graph of another shape, an onnxruntime failure (an invalid graph, external data it cannot read). ``onnx`` and
``onnxruntime`` (the ``[onnx]`` extra) are imported when used.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .preprocess import DATA_KEYS, check_data_config, check_label_names

if TYPE_CHECKING:
    import onnx
    import onnxruntime

__all__ = [
    'INPUT_NAME',
    'INT8_TOLERANCE',
    'LOGITS_ATOL',
    'LOGITS_RTOL',
    'METADATA_KEYS',
    'OUTPUT_NAME',
    'check_onnx_matches',
    'check_onnx_output',
    'open_session',
    'read_metadata',
]

INPUT_NAME = 'pixel_values'  # transformers' name for the same tensor
OUTPUT_NAME = 'logits'
METADATA_KEYS = ('architecture', 'label_names', *DATA_KEYS)
# float export: onnxruntime's logits against PyTorch's, elementwise |ort - torch| <= ATOL + RTOL * |torch| (measured:
# about 3e-6 on the shipped weights, ~1e-7 relative)
LOGITS_ATOL = 1e-4
LOGITS_RTOL = 1e-4
# int8: logits move by quantization, so the check is that they stay close to the float model's, relative to their
# spread: max |int8 - float| <= INT8_TOLERANCE * (max - min of the float logits) over the check batch
INT8_TOLERANCE = 0.1
# the operators onnxruntime's quantizers write: a graph with any of them is held to the int8 tolerance
_QUANTIZED_OPS = frozenset(
    {'DynamicQuantizeLinear', 'QuantizeLinear', 'DequantizeLinear', 'MatMulInteger', 'ConvInteger', 'QLinearMatMul',
     'QLinearConv', 'DynamicQuantizeMatMul', 'MatMulIntegerToFloat'}
)  # fmt: skip
_FLOAT = 1  # onnx.TensorProto.FLOAT


def read_metadata(path: str | os.PathLike, source: str | None = None) -> dict[str, Any]:
    """The metadata of an ``.onnx`` file written by ``smallvit onnx``, decoded and checked; a one-line error otherwise.

    The preprocessing keys go through :func:`~timm_smallvit.preprocess.check_data_config` with the graph's input
    channels and size, and label_names through :func:`~timm_smallvit.preprocess.check_label_names` with its output
    classes; the graph must take one float batch ``pixel_values (batch, C, H, W)`` and give ``logits (batch,
    classes)``. Nothing outside the file is read (external data stays unread).

    Args:
        path: The ``.onnx`` file.
        source: How errors name it (default: the path).
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    where = source or str(path)
    if not path.is_file():
        raise FileNotFoundError(f'{where}: no such file.')
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ValueError(f'{where}: not an ONNX model ({_one_line(e)}).') from None
    if not proto.graph.node:
        raise ValueError(f'{where}: not an ONNX model (no graph).')
    props = {p.key: p.value for p in proto.metadata_props}
    missing = [k for k in METADATA_KEYS if k not in props]
    if missing:
        raise ValueError(
            f'{where}: an ONNX model without the preprocessing metadata (missing {", ".join(missing)}); '
            'export it with `smallvit onnx`.'
        )
    try:
        meta = {k: json.loads(props[k]) for k in METADATA_KEYS}
    except json.JSONDecodeError as e:
        raise ValueError(f'{where}: unreadable metadata ({e}).') from None
    if not isinstance(meta['architecture'], str):
        raise ValueError(f'{where}: architecture {props["architecture"][:80]}: expected a model name (a string).')
    unset = [k for k in DATA_KEYS if meta[k] in (None, '')]
    if unset:
        raise ValueError(
            f'{where}: metadata {", ".join(unset)} unset: expected the data config `smallvit onnx` writes.'
        )
    chans, size, classes = _graph_io(proto, where)
    check_data_config(meta, source=where, in_chans=chans, img_size=size)
    check_label_names(meta['label_names'], source=where, num_classes=classes)
    return meta


def _graph_io(proto: onnx.ModelProto, where: str) -> tuple[int, tuple[int, int], int]:
    """The graph's input channels and size and its output classes, from the shapes it declares."""
    graph = proto.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    dims = _dims(inputs[0]) if len(inputs) == 1 else None
    if (
        dims is None
        or inputs[0].name != INPUT_NAME
        or inputs[0].type.tensor_type.elem_type != _FLOAT
        or len(dims) != 4
        or not all(isinstance(d, int) and d > 0 for d in dims[1:])
    ):
        shown = ', '.join(f'{i.name} {_shape(i)}' for i in inputs) or 'nothing'
        raise ValueError(
            f'{where}: the graph takes {shown}: expected one float input {INPUT_NAME} (batch, C, H, W), with C, H '
            'and W fixed, as `smallvit onnx` writes.'
        )
    out = graph.output[0] if len(graph.output) else None
    out_dims = _dims(out) if out is not None else None
    if (
        out is None
        or out_dims is None
        or out.name != OUTPUT_NAME
        or len(out_dims) != 2
        or not isinstance(out_dims[1], int)
        or out_dims[1] < 1
    ):
        shown = f'{out.name} {_shape(out)}' if out is not None else 'nothing'
        raise ValueError(
            f'{where}: the graph gives {shown}: expected {OUTPUT_NAME} (batch, classes), a fixed number of classes.'
        )
    c, h, w = (int(d) for d in dims[1:])  # checked to be ints above
    return c, (h, w), int(out_dims[1])


def _dims(value: onnx.ValueInfoProto) -> list[int | str] | None:
    tensor = value.type.tensor_type
    if not value.type.HasField('tensor_type') or not tensor.HasField('shape'):
        return None  # a rank the file does not say
    return [d.dim_value if d.HasField('dim_value') else (d.dim_param or '?') for d in tensor.shape.dim]


def _shape(value: onnx.ValueInfoProto) -> str:
    dims = _dims(value)
    return 'of unknown shape' if dims is None else f'({", ".join(map(str, dims))})'


def open_session(
    path: str | os.PathLike, meta: Mapping[str, Any], threads: int | None = None, source: str | None = None
) -> onnxruntime.InferenceSession:
    """An onnxruntime session of a file :func:`read_metadata` checked, proven on one blank image.

    onnxruntime's own failures (an invalid graph, external data it refuses or cannot find, a graph that does not run)
    and logits of another shape than ``(1, classes)`` are one-line ValueErrors.

    Args:
        path: The ``.onnx`` file.
        meta: What :func:`read_metadata` returned for it.
        threads: onnxruntime's intra-op threads (default: its own choice).
        source: How errors name the file (default: the path).
    """
    import onnxruntime as ort

    where = source or str(path)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: the optimizer's notes are not the user's concern
    try:
        session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        outputs = session.get_outputs()
        classes = outputs[0].shape[-1] if outputs and outputs[0].shape else None
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: np.zeros((1, *meta['input_size']), np.float32)})[0]
    except Exception as e:  # onnxruntime's Fail, InvalidGraph, InvalidArgument, ... derive from Exception alone
        raise ValueError(f'{where}: onnxruntime cannot run it ({_one_line(e)}).') from None
    if not isinstance(logits, np.ndarray) or logits.shape != (1, classes):
        shape = getattr(logits, 'shape', type(logits).__name__)
        raise ValueError(f'{where}: the graph gives logits of shape {shape} for one image, expected (1, {classes}).')
    return session


def check_onnx_output(
    path: str | os.PathLike, x: np.ndarray, reference: np.ndarray, int8: bool = False, source: str | None = None
) -> None:
    """``onnx.checker``, then onnxruntime's logits for ``x`` against ``reference``; ValueError above the tolerance.

    Args:
        path: The ``.onnx`` file.
        x: An input batch.
        reference: PyTorch's logits for ``x``.
        int8: A quantized model (the INT8_TOLERANCE check instead of LOGITS_ATOL/LOGITS_RTOL).
        source: How errors name the file (default: the path).
    """
    import onnx
    import onnxruntime as ort

    where = source or str(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]
    except Exception as e:  # onnx's ValidationError, onnxruntime's own
        raise ValueError(f'{where}: not a valid ONNX model onnxruntime runs ({_one_line(e)}).') from None
    if logits.shape != reference.shape:
        raise ValueError(f'{where}: onnxruntime returned logits of shape {logits.shape}, PyTorch {reference.shape}.')
    diff = float(np.abs(logits - reference).max())
    if int8:
        spread = float(reference.max() - reference.min())
        if not diff <= INT8_TOLERANCE * spread:
            raise ValueError(
                f'{where}: int8 logits differ from the float model by up to {diff:.3g}, over '
                f'{INT8_TOLERANCE} of their range ({spread:.3g}).'
            )
    elif not np.allclose(logits, reference, rtol=LOGITS_RTOL, atol=LOGITS_ATOL):
        raise ValueError(
            f'{where}: onnxruntime logits differ from PyTorch by up to {diff:.3g} (tolerance {LOGITS_ATOL} + '
            f'{LOGITS_RTOL} x |logit|).'
        )


def check_onnx_matches(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    data_config: Mapping[str, Any],
    model: torch.nn.Module,
    source: str,
) -> None:
    """An export's ``model.onnx`` is the ONNX file of its weights: metadata, output and logits as config.json says.

    Its metadata must pass :func:`read_metadata`, name config.json's architecture and label_names and the data config
    timm resolves from config.json; its output must have config.json's num_classes; and its logits on a random batch
    must be the model's (within the float tolerance, or the int8 one for a quantized graph).

    Args:
        path: The ``.onnx`` file.
        config: The export's config.json.
        data_config: timm's data config of the export (``resolve_data_config`` of the pretrained_cfg timm reads).
        model: The model of the export's weights.
        source: How errors name the file.
    """
    import onnx

    meta = read_metadata(path, source)
    labels = config.get('label_names', dict(config.get('pretrained_cfg') or {}).get('label_names'))
    expected = {'architecture': config.get('architecture'), 'label_names': labels, **dict(data_config)}
    for key in METADATA_KEYS:
        if not _same(meta[key], expected.get(key)):
            raise ValueError(
                f'{source}: {key} {_short(meta[key])}: expected {_short(expected.get(key))}, as config.json says. '
                'Is it the ONNX file of another model? Export again with --onnx.'
            )
    session = open_session(path, meta, source=source)
    classes = session.get_outputs()[0].shape[-1]
    if classes != config.get('num_classes'):
        raise ValueError(f'{source}: {classes} classes out: expected {config.get("num_classes")}, as config.json says.')
    x = torch.randn((3, *meta['input_size']), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model.eval()(x).float().numpy()
    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    check_onnx_output(path, x.numpy(), reference, int8=bool(ops & _QUANTIZED_OPS), source=source)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        return numbers and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + '...'


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = ' '.join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + '...'
