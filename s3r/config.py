"""The two configurations every s3r checkpoint holds: the encoder's architecture and regularisation
(`Wav2Vec2Config`, Hugging Face's field names; checkpoint.CONFIG_NAMES maps fairseq's) and what
S3-Router masks and trains (`RouteConfig`, upstream's options; recipe.MODEL_FLAGS maps its flags).
model.py builds the encoder from the first and routes it by the second.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from . import structured
from .errors import ConfigError


@dataclass
class Wav2Vec2Config:
    """Architecture and regularisation of one encoder; saved inside every s3r checkpoint. The
    fairseq and Hugging Face name of every field: checkpoint.CONFIG_NAMES."""
    conv_dim: tuple = (512, 512, 512, 512, 512, 512, 512)  # channels out of each extractor conv
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)  # their kernel sizes
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)  # their strides: 320x fewer frames than samples
    conv_bias: bool = False  # whether the extractor convs have a bias
    feat_extract_norm: str = "group"  # group: a group norm after conv 0; layer: one after each
    hidden_size: int = 768  # the model width C
    num_hidden_layers: int = 12  # transformer blocks
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # FFN width
    hidden_act: str = "gelu"  # FFN activation, a key of ACTIVATIONS
    layer_norm_first: bool = False  # pre-LN blocks (large, XLS-R); False: post-LN (base)
    layer_norm_eps: float = 1e-5
    feat_proj_layer_norm: bool = True  # LayerNorm before the feature projection (not in HuBERT)
    conv_pos_kernel: int = 128  # positional conv kernel (data2vec: of each of its convs)
    conv_pos_groups: int = 16  # positional conv groups
    conv_pos_depth: int = 1  # 1: one weight-normed positional conv; more: a stack of plain ones
    vocab_size: int = 0  # CTC outputs; 0: no head, the model returns hidden states
    normalize: bool = False  # each waveform is normalised to zero mean, unit variance first
    blank_weight: float = 0.0  # added to (blank_mode "add") or set as ("set") the blank's logit
    blank_mode: str = "add"
    # regularisation: training only
    hidden_dropout: float = 0.1  # on every residual branch and the encoder input
    attention_dropout: float = 0.1  # on the attention probabilities
    activation_dropout: float = 0.1  # inside the FFN, after the activation
    feat_proj_dropout: float = 0.0  # after the feature projection
    final_dropout: float = 0.0  # before the CTC head
    layerdrop: float = 0.1  # the chance of skipping each transformer block (LayerDrop)
    apply_spec_augment: bool = True  # False: no time or channel masks, whatever the probabilities
    mask_time_prob: float = 0.0  # about this fraction of frames becomes the mask embedding
    mask_time_length: int = 10  # frames per time span
    mask_feature_prob: float = 0.0  # about this fraction of channels is zeroed
    mask_feature_length: int = 64  # channels per channel span
    gradient_checkpointing: bool = False  # recompute each block in the backward: less memory
    # per-layer sizes of a model that compact.py cut down (None: all alike); the head size stays
    intermediate_sizes: tuple | None = None
    num_heads_per_layer: tuple | None = None
    # utterance classification (s3r/classify.py); labels None: not a classifier
    labels: tuple | None = None  # class names in output order
    classifier_proj_size: int = 256  # the projector's width, before mean pooling
    use_weighted_layer_sum: bool = False  # pool softmax(layer_weights) over all hidden states

    def __post_init__(self):
        for name in ("conv_dim", "conv_kernel", "conv_stride"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ConfigError("conv_dim, conv_kernel and conv_stride must have the same length")
        for name, choices in (("feat_extract_norm", ("group", "layer")),
                              ("blank_mode", ("add", "set"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {choices}, not {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                              f"{self.num_attention_heads} heads")
        for name in ("intermediate_sizes", "num_heads_per_layer"):
            if (sizes := getattr(self, name)) is not None:
                if len(sizes) != self.num_hidden_layers or min(sizes) < 1:
                    raise ConfigError(f"{name} needs {self.num_hidden_layers} values >= 1, "
                                      f"not {list(sizes)}")
                setattr(self, name, tuple(int(v) for v in sizes))
        if self.labels is not None:
            self.labels = tuple(str(v) for v in self.labels)

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Wav2Vec2Config:
        if unknown := sorted(set(d) - {f.name for f in fields(cls)}):
            raise ConfigError(f"unknown Wav2Vec2Config field(s): {', '.join(unknown)}")
        return cls(**d)


INIT_SCORES = ("kaiming_uniform", "weight_rank", "weight_magnitude_with_scale", "weight_magnitude")


@dataclass
class RouteConfig:
    """What S3-Router masks and trains (upstream `wav2vec_ctc_st`; recipe.MODEL_FLAGS names the
    upstream option of each field). Defaults: the upstream README's finetuning command; upstream's
    model defaults differ in init_score (kaiming_uniform), fix_attn and trainable_proj (False)."""
    # The fraction of each routed weight tensor KEPT (upstream's name and meaning: "weight
    # remaining ratio"): 0.9 keeps 90% of the weights (10% sparsity), 0.3 keeps 30%.
    prune_rate: float = 0.9
    init_score: str = "weight_rank"  # how the scores start, one of INIT_SCORES (initial_scores)
    score_scale: float = 1.0  # weight_magnitude_with_scale: scores = W / score_scale
    fix_attn: bool = True  # attention q/k/v/out stay dense, only the FFN is routed
    fix_fc: bool = False  # the FFN's fc1/fc2 stay dense, only attention is routed
    route_feature_extractor: bool = False  # mask the extractor's convs too
    route_pos_conv: bool = False  # mask the positional conv too
    route_feature_projection: bool = False  # mask the feature projection too
    trainable_proj: bool = True  # the CTC head trains (False: a random frozen head)
    trainable_bias: bool = False  # the biases train
    trainable_layer_norm: bool = False  # the LayerNorms train
    trainable_pos: bool = False  # the positional conv trains
    trainable_feature_projection: bool = False  # the feature projection trains
    co_train: bool = False  # the weights train together with the masks
    # What one score covers: a `weight` (upstream), or a group (structured.py): `row`, `column`,
    # FFN `neuron`, attention `head`, `neuron+head`, or `n:m` (e.g. 2:4).
    route_granularity: str = "weight"

    def __post_init__(self):
        if not 0.0 < self.prune_rate <= 1.0:
            raise ConfigError(f"prune_rate (the fraction kept) must be in (0, 1], "
                              f"not {self.prune_rate}")
        if self.init_score not in INIT_SCORES:
            raise ConfigError(f"unknown init_score {self.init_score!r}; "
                              f"choose from {', '.join(INIT_SCORES)}")
        if self.fix_attn and self.fix_fc:
            raise ConfigError("fix_attn and fix_fc leave nothing to route "
                              "(to train the head alone: prune_rate 1.0)")
        g, nm = self.route_granularity, structured.n_of_m(self.route_granularity)
        if nm is None and g not in structured.GRANULARITIES:
            raise ConfigError(f"unknown route_granularity {g!r}; "
                              f"choose from {', '.join(structured.GRANULARITIES)} or n:m")
        if nm and self.prune_rate != nm[0] / nm[1]:
            raise ConfigError(f"route_granularity {g} keeps {nm[0]} of {nm[1]}: "
                              f"set prune_rate {nm[0] / nm[1]:g}")
        if ("neuron" in g and self.fix_fc) or ("head" in g and self.fix_attn):
            raise ConfigError(f"route_granularity {g} routes what fix_fc / fix_attn keep dense: "
                              f"turn those off")
