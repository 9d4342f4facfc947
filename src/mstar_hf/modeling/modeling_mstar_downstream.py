"""Downstream heads on mSTAR patch features: MIL slide classification and discrete-time survival.

Both read the patch features of a slide (`[B, N, D]`, from `mstar-hf extract`) through a MIL encoder,
either ABMIL (gated or plain attention pooling, as in CLAM and the mSTAR downstream code) or TransMIL
(the mSTAR slide aggregator, from scratch or from the pretrained one: "mSTAR+"), then a linear layer.
Only imports torch, transformers and sibling files (copied next to checkpoints for `trust_remote_code`).
"""

import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_mstar import MStarSlideAggregatorConfig
from .configuration_mstar_downstream import MStarMILConfig, MStarSlideClassificationConfig, MStarSurvivalConfig
from .modeling_mstar_aggregator import MStarSlideAggregator, check_patch_features


@dataclass
class SlideClassifierOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` scalar, *optional*): cross-entropy, when `labels` are given.
    logits (`torch.FloatTensor` of shape `[B, num_labels]`): class scores before softmax.
    attention_scores (`torch.FloatTensor` of shape `[B, N]`): per-patch weights of the slide embedding;
        they sum to 1 over the real patches of a slide and are 0 on padding. ABMIL: its attention. TransMIL:
        softmax over patches of the scaled dot product of each re-embedded patch with the class token (the
        Nystrom attention has no exact class-token row to read; this is the patch-to-slide affinity).
    slide_embeds (`torch.FloatTensor` of shape `[B, hidden_size]`): the pooled slide representation.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    attention_scores: torch.FloatTensor | None = None
    slide_embeds: torch.FloatTensor | None = None


@dataclass
class SurvivalOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` scalar, *optional*): NLL survival loss, when bin labels (or times) and events are given.
    logits (`torch.FloatTensor` of shape `[B, num_time_bins]`): hazard logits.
    hazards (`torch.FloatTensor` of shape `[B, num_time_bins]`): P(event in bin k | survived to bin k) = sigmoid(logits).
    survival (`torch.FloatTensor` of shape `[B, num_time_bins]`): S(k) = prod_{j<=k} (1 - hazards_j).
    risk (`torch.FloatTensor` of shape `[B]`): -sum_k S(k); higher = shorter expected survival (use for C-index).
    attention_scores (`torch.FloatTensor` of shape `[B, N]`): per-patch weights, as in [`SlideClassifierOutput`].
    slide_embeds (`torch.FloatTensor` of shape `[B, hidden_size]`): the pooled slide representation.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hazards: torch.FloatTensor | None = None
    survival: torch.FloatTensor | None = None
    risk: torch.FloatTensor | None = None
    attention_scores: torch.FloatTensor | None = None
    slide_embeds: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------
# Survival helpers (Zadeh & Schmid 2020; the binning and loss of CLAM-MCAT / the mSTAR downstream code)
# ----------------------------------------------------------------------------------------------------------


def compute_time_bins(times, events, num_time_bins: int = 4, eps: float = 1e-6) -> list[float]:
    """Edges of `num_time_bins` survival-time intervals from quantiles of the uncensored times.

    As MCAT: the inner edges are the quantiles of the times of cases with an event; the outer edges are
    widened to the smallest / largest time of all cases (+- eps). Raises ValueError when there are fewer
    distinct uncensored times than bins (the quantiles would coincide).
    """
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    events = torch.as_tensor(events).flatten().bool()
    if times.numel() != events.numel():
        raise ValueError(f"compute_time_bins: {times.numel()} times but {events.numel()} events.")
    uncensored = times[events]
    if uncensored.unique().numel() < num_time_bins:
        raise ValueError(
            f"compute_time_bins: {uncensored.unique().numel()} distinct uncensored survival times, fewer than "
            f"num_time_bins={num_time_bins}; use fewer bins or a cohort with more events."
        )
    quantiles = torch.quantile(uncensored, torch.linspace(0, 1, num_time_bins + 1, dtype=torch.float64))
    edges = quantiles.tolist()
    edges[0] = min(float(times.min()), edges[0]) - eps
    edges[-1] = max(float(times.max()), edges[-1]) + eps
    return edges


def discretize_times(times: torch.Tensor, time_bins) -> torch.Tensor:
    """Bin index (long, 0..K-1) of each time: bin i holds `time_bins[i] <= t < time_bins[i+1]`; times
    outside the edges are clipped to the first / last bin."""
    times = torch.as_tensor(times)
    inner = torch.as_tensor(list(time_bins)[1:-1], dtype=times.dtype if times.is_floating_point() else torch.float64,
                            device=times.device)
    return torch.bucketize(times.to(inner.dtype), inner, right=True).long()


def nll_survival_loss(
    hazards: torch.Tensor, labels: torch.Tensor, events: torch.Tensor, alpha: float = 0.0, eps: float = 1e-7
) -> torch.Tensor:
    """Discrete-time negative log-likelihood of censored survival.

    A case with an event in bin y contributes -log S(y-1) - log h(y); a censored case last seen in bin y
    survived it: -log S(y). `hazards` [B, K], `labels` [B] bin indices, `events` [B] (1 = event observed,
    0 = censored). `alpha` up-weights the uncensored term (MCAT's `alpha_surv`).
    """
    labels = labels.long().view(-1, 1)
    censored = 1.0 - events.to(hazards.dtype).view(-1, 1)
    survival = torch.cumprod(1 - hazards, dim=1)
    survival_padded = torch.cat([torch.ones_like(censored), survival], dim=1)  # S(-1) = 1
    uncensored_loss = -(1 - censored) * (
        torch.log(torch.gather(survival_padded, 1, labels).clamp(min=eps))
        + torch.log(torch.gather(hazards, 1, labels).clamp(min=eps))
    )
    censored_loss = -censored * torch.log(torch.gather(survival_padded, 1, labels + 1).clamp(min=eps))
    loss = (1 - alpha) * (censored_loss + uncensored_loss) + alpha * uncensored_loss
    return loss.mean()


# ----------------------------------------------------------------------------------------------------------
# MIL encoders
# ----------------------------------------------------------------------------------------------------------


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim of `logits` [B, N] with masked (False) entries at exactly 0."""
    if mask is not None:
        logits = logits.masked_fill(~mask.bool(), float("-inf"))
    return torch.softmax(logits, dim=-1)


class MStarABMIL(nn.Module):
    """Attention-based MIL pooling: Linear + ReLU + Dropout, then (gated) attention over patches."""

    def __init__(self, config: MStarMILConfig):
        super().__init__()
        hidden, attn = config.hidden_size, config.attention_dim
        self.input_proj = nn.Sequential(nn.Linear(config.input_dim, hidden), nn.ReLU(), nn.Dropout(config.dropout))
        self.gated = config.gated_attention
        self.attention_a = nn.Sequential(nn.Linear(hidden, attn), nn.Tanh(), nn.Dropout(config.dropout))
        if self.gated:
            self.attention_b = nn.Sequential(nn.Linear(hidden, attn), nn.Sigmoid(), nn.Dropout(config.dropout))
        self.attention_c = nn.Linear(attn, 1)

    def forward(self, patch_features: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, D] -> (slide embedding [B, hidden], attention [B, N])."""
        hidden = self.input_proj(patch_features)
        gate = self.attention_a(hidden)
        if self.gated:
            gate = gate * self.attention_b(hidden)
        scores = masked_softmax(self.attention_c(gate).squeeze(-1), mask)
        return torch.bmm(scores.unsqueeze(1), hidden).squeeze(1), scores


class MStarDownstreamPreTrainedModel(PreTrainedModel):
    config_class = MStarMILConfig
    base_model_prefix = "mil"
    main_input_name = "patch_features"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MStarTransLayer"]

    def _init_weights(self, module):
        # the TransMIL aggregator, a PreTrainedModel of its own, initialises itself
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)

    def _build_encoder(self, config: MStarMILConfig):
        if config.head == "abmil":
            self.abmil = MStarABMIL(config)
        else:
            self.aggregator = MStarSlideAggregator(config.aggregator_config)

    def encode(self, patch_features: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Slide embeddings `[B, hidden_size]` and per-patch attention `[B, N]` of a bag batch."""
        check_patch_features(patch_features, attention_mask, self.config.input_dim, type(self).__name__)
        mask = None if attention_mask is None else attention_mask.bool()
        if self.config.head == "abmil":
            return self.abmil(patch_features, mask)
        out = self.aggregator(patch_features, mask)
        affinity = (out.patch_embeds @ out.slide_embeds.unsqueeze(-1)).squeeze(-1) / math.sqrt(out.slide_embeds.shape[-1])
        return out.slide_embeds, masked_softmax(affinity, mask)

    @classmethod
    def from_aggregator(cls, aggregator, **config_kwargs):
        """A TransMIL head initialised from a pretrained mSTAR slide aggregator ("mSTAR+").

        Args:
            aggregator: an [`MStarSlideAggregator`], a model holding one as `.aggregator` (e.g. `MStarModel`),
                or a `save_pretrained` folder / Hub id of either (loaded with `AutoModel`).
            **config_kwargs: the rest of the head's config (`num_labels`, `id2label`, `time_bins`, ...).

        The aggregator's weights are copied exactly; the final linear layer is new.
        """
        if isinstance(aggregator, (str, os.PathLike)):
            path = os.fspath(aggregator)
            model_type = AutoConfig.from_pretrained(path).model_type
            aggregator = AutoModel.from_pretrained(path, dtype=torch.float32)
            if not isinstance(aggregator, MStarSlideAggregator) and not hasattr(aggregator, "aggregator"):
                raise ValueError(f"{path}: a {model_type!r} checkpoint has no slide aggregator.")
        holder = getattr(aggregator, "aggregator", None)
        if not isinstance(aggregator, MStarSlideAggregator) and isinstance(holder, nn.Module):
            aggregator = holder
        if not isinstance(getattr(aggregator, "config", None), MStarSlideAggregatorConfig):
            raise TypeError(
                f"from_aggregator: expected an MStarSlideAggregator (or a model holding one), got {type(aggregator)}."
            )
        if config_kwargs.pop("head", "transmil") != "transmil":
            raise ValueError("from_aggregator: the pretrained aggregator is a TransMIL head; head must be 'transmil'.")
        agg_config = copy.deepcopy(aggregator.config)
        config = cls.config_class(
            head="transmil", input_dim=agg_config.input_dim, aggregator_config=agg_config.to_dict(), **config_kwargs
        )
        model = cls(config)
        model.aggregator.load_state_dict(aggregator.state_dict(), strict=True)
        return model.to(next(aggregator.parameters()).device)


class MStarForSlideClassification(MStarDownstreamPreTrainedModel):
    r"""
    Slide classification from patch features: an ABMIL or TransMIL head and a linear classifier.

    Forward:
        patch_features (`torch.FloatTensor` of shape `[B, N, input_dim]`): patch features of B slides.
        attention_mask (`torch.BoolTensor` of shape `[B, N]`, *optional*): True for real patches.
        labels (`torch.LongTensor` of shape `[B]`, *optional*): class indices; gives the cross-entropy loss.

    Returns:
        [`SlideClassifierOutput`] with `logits` `[B, num_labels]` and `attention_scores` `[B, N]`.
    """

    config_class = MStarSlideClassificationConfig

    def __init__(self, config: MStarSlideClassificationConfig):
        super().__init__(config)
        self._build_encoder(config)
        self.classifier = nn.Sequential(
            nn.Dropout(config.classifier_dropout), nn.Linear(config.hidden_size, config.num_labels)
        )
        self.post_init()

    def forward(
        self,
        patch_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SlideClassifierOutput | tuple:
        slide_embeds, scores = self.encode(patch_features, attention_mask)
        logits = self.classifier(slide_embeds)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device).long().view(-1)
            if bool(((labels < 0) | (labels >= self.config.num_labels)).any()):
                raise ValueError(
                    f"{type(self).__name__}: labels must be in [0, {self.config.num_labels}), got {labels.tolist()}."
                )
            loss = F.cross_entropy(logits, labels)
        output = SlideClassifierOutput(loss=loss, logits=logits, attention_scores=scores, slide_embeds=slide_embeds)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


class MStarForSurvivalPrediction(MStarDownstreamPreTrainedModel):
    r"""
    Discrete-time survival prediction from patch features: an ABMIL or TransMIL head and a linear layer
    giving one hazard logit per time bin, trained with the NLL survival loss.

    Forward:
        patch_features (`torch.FloatTensor` of shape `[B, N, input_dim]`): patch features of B slides.
        attention_mask (`torch.BoolTensor` of shape `[B, N]`, *optional*): True for real patches.
        labels (`torch.LongTensor` of shape `[B]`, *optional*): time-bin index of each case.
        times (`torch.FloatTensor` of shape `[B]`, *optional*): survival / follow-up times, turned into bin
            labels with `config.time_bins` when `labels` is not given.
        events (`torch.LongTensor` of shape `[B]`, *optional*): 1 = event (death) observed, 0 = censored.

    Returns:
        [`SurvivalOutput`] with `hazards`, `survival` `[B, num_time_bins]` and `risk` `[B]`.
    """

    config_class = MStarSurvivalConfig

    def __init__(self, config: MStarSurvivalConfig):
        super().__init__(config)
        self._build_encoder(config)
        self.classifier = nn.Sequential(
            nn.Dropout(config.classifier_dropout), nn.Linear(config.hidden_size, config.num_time_bins)
        )
        self.post_init()

    def forward(
        self,
        patch_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        events: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SurvivalOutput | tuple:
        slide_embeds, scores = self.encode(patch_features, attention_mask)
        logits = self.classifier(slide_embeds)
        hazards = torch.sigmoid(logits)
        survival = torch.cumprod(1 - hazards, dim=1)
        risk = -survival.sum(dim=1)
        loss = None
        if labels is None and times is not None:
            if self.config.time_bins is None:
                raise ValueError(f"{type(self).__name__}: config.time_bins is not set; pass bin `labels` or set time_bins.")
            labels = discretize_times(times.to(logits.device), self.config.time_bins)
        if labels is not None:
            if events is None:
                raise ValueError(f"{type(self).__name__}: the survival loss needs `events` (1 = event, 0 = censored).")
            labels = labels.to(logits.device).long().view(-1)
            if bool(((labels < 0) | (labels >= self.config.num_time_bins)).any()):
                raise ValueError(
                    f"{type(self).__name__}: time-bin labels must be in [0, {self.config.num_time_bins}), "
                    f"got {labels.tolist()}."
                )
            loss = nll_survival_loss(hazards, labels, events.to(logits.device), alpha=self.config.survival_loss_alpha)
        output = SurvivalOutput(
            loss=loss, logits=logits, hazards=hazards, survival=survival, risk=risk, attention_scores=scores,
            slide_embeds=slide_embeds,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


__all__ = [
    "MStarABMIL",
    "MStarDownstreamPreTrainedModel",
    "MStarForSlideClassification",
    "MStarForSurvivalPrediction",
    "SlideClassifierOutput",
    "SurvivalOutput",
    "compute_time_bins",
    "discretize_times",
    "nll_survival_loss",
]
