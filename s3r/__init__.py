"""s3r: a minimal PyTorch reference implementation of S3-Router (Fu et al., NeurIPS 2022)."""


class S3RError(Exception):
    """A user-facing error (bad file, key, flag or data) whose one-line message names the culprit."""


from .model import (MaskedConv1d, MaskedLinear, RouteConfig, Wav2Vec2Config, Wav2Vec2ForCTC,  # noqa: E402
                    topk_mask)
from .checkpoint import load_pretrained  # noqa: E402

__all__ = ["S3RError", "load_pretrained", "MaskedConv1d", "MaskedLinear", "RouteConfig", "Wav2Vec2Config", "Wav2Vec2ForCTC", "topk_mask"]
