"""Utterance classification on the same (routed) encoder: keyword spotting, speaker and language ID, intent.

    model = Wav2Vec2ForSequenceClassification(replace(config, labels=("yes", "no", ...)))
    logits, frames = model(wav, lengths)          # (B, num_labels), valid frames (B,)

Hugging Face's `Wav2Vec2ForSequenceClassification` (transformers `modeling_wav2vec2.py`), module for module and with
its config options, so its checkpoints load and s3r exports to it:

    encoder output (B, T, C)             or, use_weighted_layer_sum: softmax(layer_weights) . every hidden state
    projector     Linear C -> classifier_proj_size
    mean pooling  over each utterance's valid frames (padded frames never count)
    classifier    Linear classifier_proj_size -> len(labels)

SUPERB's utterance-level tasks (s3prl `downstream/{speech_commands,voxceleb1,fluent_commands}`) are the same
recipe: a linear projection, mean pooling over valid frames, a linear classifier, cross-entropy. The encoder is
`Wav2Vec2ForCTC`'s (this class is one without a CTC head), so S3-Router's routing, score inits, weight finetuning,
structured routes and the speed paths apply to it unchanged, and its routes name the same layers as a CTC route
on the same weights: one bundle holds both kinds (s3r/routes.py).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from .config import RouteConfig, Wav2Vec2Config
from .errors import ConfigError
from .model import Wav2Vec2ForCTC

HEAD_KEYS = ("lm_head.", "projector.", "classifier.", "layer_weights")  # the task-specific tensors of either kind


def is_head(key: str) -> bool:
    """Whether a state-dict key belongs to a head (CTC or classification) rather than to the shared encoder."""
    return key.startswith(HEAD_KEYS)


def head_kind(config: Wav2Vec2Config) -> str:
    """`classification`, `ctc` or `none` (a bare encoder): what a model of `config` outputs."""
    return "classification" if config.labels is not None else "ctc" if config.vocab_size else "none"


class Wav2Vec2ForSequenceClassification(Wav2Vec2ForCTC):
    """The encoder, a projector, mean pooling over valid frames, a classifier: model(wav, lengths) -> (logits (B, K),
    valid frames (B,)). `config.labels` names the K classes (HF id2label)."""

    def __init__(self, config: Wav2Vec2Config):
        if not config.labels:
            raise ConfigError("a classification model needs labels (Wav2Vec2Config.labels: the class names)")
        super().__init__(replace(config, vocab_size=0))
        self.set_labels(config.labels)

    def set_labels(self, labels: tuple | list, classifier_proj_size: int | None = None,
                   use_weighted_layer_sum: bool | None = None):
        """A fresh head for `labels` (HF's init: weights N(0, 0.02), biases 0, layer weights uniform), trained
        unless the route freezes it (RouteConfig.trainable_proj, as the CTC head)."""
        c = self.config = replace(self.config, labels=tuple(labels), **{k: v for k, v in (
            ("classifier_proj_size", classifier_proj_size), ("use_weighted_layer_sum", use_weighted_layer_sum))
            if v is not None})
        if not c.labels:
            raise ConfigError("a classification model needs at least one label")
        self.projector = nn.Linear(c.hidden_size, c.classifier_proj_size)
        self.classifier = nn.Linear(c.classifier_proj_size, len(c.labels))
        for layer in (self.projector, self.classifier):
            nn.init.normal_(layer.weight, std=0.02)  # HF initializer_range
            nn.init.zeros_(layer.bias)
        layers = c.num_hidden_layers + 1  # the input of every block and the encoder output
        self.layer_weights = nn.Parameter(torch.ones(layers) / layers) if c.use_weighted_layer_sum else None
        trains = self.route_config is None or self.route_config.trainable_proj
        for name, p in self.named_parameters():
            if is_head(name):
                p.requires_grad_(trains)

    def set_vocab_size(self, vocab_size: int):
        if vocab_size:
            raise ConfigError("a classification model has no CTC head (vocab_size must stay 0)")
        super().set_vocab_size(0)

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None, detach_encoder: bool = False):
        """wav (B, S) 16 kHz; lengths (B,) valid samples or None -> logits (B, num_labels), valid frames (B,).
        `detach_encoder`: no gradient reaches the encoder, only the head learns (freeze_finetune_updates)."""
        hidden = [] if self.config.use_weighted_layer_sum else None
        x, out_lengths, padding_mask = self.embed(wav, lengths, hidden)  # (B, T, C)
        if hidden is not None:  # HF: stack (B, L + 1, T, C), weight by softmax(layer_weights), sum over layers
            weights = self.layer_weights.softmax(-1).to(x.dtype)
            x = (torch.stack(hidden, dim=1) * weights.view(-1, 1, 1)).sum(dim=1)
        if detach_encoder:
            x = x.detach()
        x = self.projector(x)  # (B, T, P)
        if padding_mask is None:
            pooled = x.mean(dim=1)
        else:  # the mean of the valid frames (an utterance too short for one frame: its projector bias)
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            pooled = x.sum(dim=1) / out_lengths.clamp(min=1).unsqueeze(-1).to(x.dtype)
        return self.classifier(pooled), out_lengths  # (B, K)

    def _trains_in_mask_mode(self, name: str, cfg: RouteConfig) -> bool:
        if is_head(name):
            return cfg.trainable_proj
        return super()._trains_in_mask_mode(name, cfg)


def new_model(config: Wav2Vec2Config) -> Wav2Vec2ForCTC:
    """The model class a config describes: a classifier when it has labels, else a CTC model (or a bare encoder)."""
    return Wav2Vec2ForSequenceClassification(config) if config.labels is not None else Wav2Vec2ForCTC(config)


def with_head(model: Wav2Vec2ForCTC, config: Wav2Vec2Config) -> Wav2Vec2ForCTC:
    """`model`'s encoder under the head `config` describes (a fresh one of that kind and size), sharing the encoder's
    modules: masks or weights changed on one are changed on the other. Returns `model` itself when it already has
    a head of that kind and size."""
    if head_kind(config) != "classification":
        if isinstance(model, Wav2Vec2ForSequenceClassification):
            model = _share_encoder(Wav2Vec2ForCTC(replace(config, vocab_size=0, labels=None)), model)
        if model.config.vocab_size != config.vocab_size:
            model.set_vocab_size(config.vocab_size)
        return model
    if isinstance(model, Wav2Vec2ForSequenceClassification):
        c = model.config
        if (c.labels, c.classifier_proj_size, c.use_weighted_layer_sum) != (
                config.labels, config.classifier_proj_size, config.use_weighted_layer_sum):
            model.set_labels(config.labels, config.classifier_proj_size, config.use_weighted_layer_sum)
        return model
    encoder_config = replace(model.config, labels=config.labels, classifier_proj_size=config.classifier_proj_size,
                             use_weighted_layer_sum=config.use_weighted_layer_sum, vocab_size=0)
    return _share_encoder(Wav2Vec2ForSequenceClassification(encoder_config), model)


def _share_encoder(new: Wav2Vec2ForCTC, old: Wav2Vec2ForCTC) -> Wav2Vec2ForCTC:
    """`new` with `old`'s encoder modules (not copies), route config, vocabulary and source."""
    new.feature_extractor, new.feature_projection, new.encoder = old.feature_extractor, old.feature_projection, \
        old.encoder
    new.masked_spec_embed = old.masked_spec_embed
    new.route_config = old.route_config
    for attr in ("vocab", "source"):
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    return new.train(old.training).to(old.masked_spec_embed.device)
