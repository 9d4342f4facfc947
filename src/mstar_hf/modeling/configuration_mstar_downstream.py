"""Configurations of the downstream heads on mSTAR patch features.

`MStarSlideClassificationConfig` ([`MStarForSlideClassification`]) and `MStarSurvivalConfig`
([`MStarForSurvivalPrediction`]) share the multiple-instance-learning (MIL) encoder settings: an ABMIL
attention pooling head or a TransMIL aggregator (the mSTAR slide aggregator, optionally pretrained:
"mSTAR+"). This file must only import from transformers (and the standard library): it is copied next to
saved checkpoints for `trust_remote_code` loading.
"""

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_mstar import MStarSlideAggregatorConfig

MIL_HEADS = ("abmil", "transmil")


@strict
class MStarMILConfig(PreTrainedConfig):
    r"""
    Shared settings of the MIL heads (not a model type of its own).

    Args:
        head (`str`, *optional*, defaults to `"abmil"`):
            `"abmil"`: attention-based MIL (Ilse et al. 2018, as in CLAM): Linear(input_dim -> hidden_size),
            ReLU, Dropout, then attention hidden_size -> attention_dim -> 1 and an attention-weighted mean.
            `"transmil"`: the mSTAR slide aggregator (TransMIL); its class token is the slide embedding.
        input_dim (`int`, *optional*, defaults to 1024): width of the patch features.
        hidden_size (`int`, *optional*, defaults to 512): width of the slide embedding (ABMIL); for
            `"transmil"` it is taken from `aggregator_config.hidden_size`.
        attention_dim (`int`, *optional*, defaults to 128): width of the ABMIL attention network.
        gated_attention (`bool`, *optional*, defaults to `True`): gated attention (tanh * sigmoid branches)
            or plain (tanh) attention.
        dropout (`float`, *optional*, defaults to 0.25): dropout after the ABMIL input projection and in its
            attention network.
        classifier_dropout (`float`, *optional*, defaults to 0.0): dropout before the final linear layer.
        aggregator_config (`MStarSlideAggregatorConfig` or `dict`, *optional*): the TransMIL aggregator
            (`head="transmil"`); defaults to the mSTAR aggregator with `input_dim`.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the normal init of linear layers.
    """

    sub_configs_defaults = {
        "aggregator_config": SubConfigSpec(config_class=MStarSlideAggregatorConfig, optional=True),
    }

    head: str = "abmil"
    input_dim: int = 1024
    hidden_size: int = 512
    attention_dim: int = 128
    gated_attention: bool = True
    dropout: float = 0.25
    classifier_dropout: float = 0.0
    aggregator_config: PreTrainedConfig | dict | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.head not in MIL_HEADS:
            raise ValueError(f"{type(self).__name__}: head must be one of {MIL_HEADS}, got {self.head!r}.")
        if self.head == "transmil" and self.aggregator_config is None:
            self.aggregator_config = {"input_dim": self.input_dim}
        if self.head == "abmil":
            self.aggregator_config = None  # no aggregator in an ABMIL head
        super().__post_init__(**kwargs)
        if self.aggregator_config is not None:
            if self.aggregator_config.input_dim != self.input_dim:
                raise ValueError(
                    f"{type(self).__name__}: input_dim={self.input_dim} but the aggregator takes "
                    f"{self.aggregator_config.input_dim}-d features; they must match."
                )
            self.hidden_size = self.aggregator_config.hidden_size


@strict
class MStarSlideClassificationConfig(MStarMILConfig):
    r"""
    Configuration of [`MStarForSlideClassification`]: a MIL head (see [`MStarMILConfig`]) and a linear
    classifier over `num_labels` classes (`id2label` / `label2id` name them).

    Example:
    ```python
    >>> from mstar_hf import MStarForSlideClassification, MStarSlideClassificationConfig
    >>> config = MStarSlideClassificationConfig(head="abmil", input_dim=1024, num_labels=3)
    >>> model = MStarForSlideClassification(config)
    ```"""

    model_type = "mstar_slide_classification"


@strict
class MStarSurvivalConfig(MStarMILConfig):
    r"""
    Configuration of [`MStarForSurvivalPrediction`]: a MIL head (see [`MStarMILConfig`]) predicting the
    discrete-time hazard of each of `num_time_bins` survival-time intervals.

    Args:
        num_time_bins (`int`, *optional*, defaults to 4): number of time intervals (the authors' and
            MCAT's 4 quartile bins).
        time_bins (`list[float]`, *optional*): the `num_time_bins + 1` interval edges, from quantiles of the
            uncensored survival times of the training cohort (`compute_time_bins`). A time `t` falls in bin
            `i` when `time_bins[i] <= t < time_bins[i + 1]`; times outside the edges go to the first / last
            bin. Needed only to turn times into bin labels inside `forward`.
        survival_loss_alpha (`float`, *optional*, defaults to 0.0): weight of the extra uncensored term of the
            NLL survival loss, `(1 - alpha) * nll + alpha * uncensored_nll` (MCAT's `alpha_surv`).
    """

    model_type = "mstar_survival"

    num_time_bins: int = 4
    time_bins: list[int | float] | None = None
    survival_loss_alpha: float = 0.0

    def __post_init__(self, **kwargs):
        if self.num_time_bins < 1:
            raise ValueError(f"MStarSurvivalConfig: num_time_bins must be >= 1, got {self.num_time_bins}.")
        if self.time_bins is not None:
            self.time_bins = [float(t) for t in self.time_bins]
            if len(self.time_bins) != self.num_time_bins + 1:
                raise ValueError(
                    f"MStarSurvivalConfig: time_bins needs num_time_bins + 1 = {self.num_time_bins + 1} edges, "
                    f"got {len(self.time_bins)}."
                )
            if not all(math.isfinite(t) for t in self.time_bins) or any(
                b <= a for a, b in zip(self.time_bins, self.time_bins[1:])
            ):
                raise ValueError(f"MStarSurvivalConfig: time_bins must be finite and increasing, got {self.time_bins}.")
        if not 0.0 <= self.survival_loss_alpha <= 1.0:
            raise ValueError(f"MStarSurvivalConfig: survival_loss_alpha must be in [0, 1], got {self.survival_loss_alpha}.")
        super().__post_init__(**kwargs)


__all__ = ["MStarMILConfig", "MStarSlideClassificationConfig", "MStarSurvivalConfig", "MIL_HEADS"]
