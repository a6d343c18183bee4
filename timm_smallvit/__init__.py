"""timm-smallvit: small Vision Transformers as first-class timm models.

``import timm_smallvit`` registers the ``smallvit*`` family in timm's model registry, so that
``timm.create_model('smallvit')`` and ``timm.create_model('hf-hub:<repo>', pretrained=True)`` work.
"""

from .export import export_checkpoint
from .hub import create_model, push_to_hub
from .smallvit import SmallViT, checkpoint_filter_fn, convert_d2l_state_dict, to_vision_transformer

__version__ = '0.1.0'

__all__ = [
    'SmallViT',
    'checkpoint_filter_fn',
    'convert_d2l_state_dict',
    'create_model',
    'export_checkpoint',
    'push_to_hub',
    'to_vision_transformer',
]
