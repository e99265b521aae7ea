"""s3r: a minimal PyTorch reference implementation of S3-Router (Fu et al., NeurIPS 2022)."""
from .checkpoint import load_pretrained
from .classify import Wav2Vec2ForSequenceClassification
from .config import RouteConfig, Wav2Vec2Config
from .errors import ConfigError, S3RError
from .model import MaskedConv1d, MaskedLinear, Wav2Vec2ForCTC, topk_mask

__all__ = ["ConfigError", "MaskedConv1d", "MaskedLinear", "RouteConfig", "S3RError", "Wav2Vec2Config",
           "Wav2Vec2ForCTC", "Wav2Vec2ForSequenceClassification", "load_pretrained", "topk_mask"]
