"""The multimodal mSTAR model: slide (patch encoder + TransMIL aggregator), report (any transformers text
encoder) and RNA-Seq (Performer gene encoder), projected into one space and trained with the Stage 1
losses (inter-modality InfoNCE + inter-cancer batch-hard triplet).

Only imports torch, transformers and sibling files (copied next to checkpoints for `trust_remote_code`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_mstar import MStarConfig, MStarGeneConfig, MStarPatchConfig, MStarSlideAggregatorConfig
from .modeling_mstar_aggregator import MStarSlideAggregator
from .modeling_mstar_gene import MStarGeneEncoder
from .modeling_mstar_patch import MStarPatchModel

MODALITIES = ("slide", "report", "rna")
PAIRS = (("slide", "report"), ("slide", "rna"), ("report", "rna"))


@dataclass
class MStarOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` scalar, *optional*): weighted contrastive + triplet loss (`return_loss=True`).
    contrastive_loss (`torch.FloatTensor` scalar): mean of the symmetric InfoNCE of the pairs that had cases.
    triplet_loss (`torch.FloatTensor` scalar): batch-hard inter-cancer triplet loss (0 if no valid triplet).
    pair_losses (`dict[str, torch.FloatTensor]`): InfoNCE per pair, keys like `"slide_report"`.
    logits_slide_report, logits_slide_rna, logits_report_rna (`torch.FloatTensor` `[B, B]`): scaled cosine
        similarities; rows/columns of absent modalities are meaningless (see the presence masks).
    slide_embeds, text_embeds, rna_embeds (`torch.FloatTensor` `[B, projection_dim]`): L2-normalised
        projected embeddings; zero rows where the modality is absent.
    slide_present, report_present, rna_present (`torch.BoolTensor` `[B]`): which cases had each modality.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    triplet_loss: torch.FloatTensor | None = None
    pair_losses: dict | None = None
    logits_slide_report: torch.FloatTensor | None = None
    logits_slide_rna: torch.FloatTensor | None = None
    logits_report_rna: torch.FloatTensor | None = None
    slide_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    rna_embeds: torch.FloatTensor | None = None
    slide_present: torch.BoolTensor | None = None
    report_present: torch.BoolTensor | None = None
    rna_present: torch.BoolTensor | None = None


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP loss between matched rows of L2-normalised `a` and `b` [n, P]; returns (loss, logits)."""
    logits = logit_scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2, logits


def batch_hard_triplet_loss(
    embeds: dict[str, torch.Tensor],
    present: dict[str, torch.Tensor],
    labels: torch.Tensor,
    margin: float,
) -> tuple[torch.Tensor, dict]:
    """Inter-cancer triplet loss with batch-hard mining on the concatenated modality embeddings.

    A case's anchor is the concatenation of its (normalised) modality embeddings. Design choice for
    missing modalities: the squared distance of two cases sums only the modalities both have, rescaled
    by (number of modalities / number shared), so it estimates the full concatenated distance; cases
    that share no modality are not compared. For every anchor the farthest same-cancer case is the
    positive and the nearest other-cancer case the negative; loss = mean relu(d_ap - d_an + margin)
    over anchors that have both (label -1 = unknown is never used).

    Returns the loss and `{"anchors", "positives", "negatives"}` index tensors of the triplets used.
    """
    names = list(embeds)
    batch = labels.shape[0]
    sq = labels.new_zeros((batch, batch), dtype=embeds[names[0]].dtype)
    shared = labels.new_zeros((batch, batch), dtype=embeds[names[0]].dtype)
    for name in names:
        both = (present[name][:, None] & present[name][None, :]).to(sq.dtype)
        sq = sq + torch.cdist(embeds[name], embeds[name]).pow(2) * both
        shared = shared + both
    comparable = shared > 0
    dist = torch.sqrt((sq * len(names) / shared.clamp(min=1)).clamp(min=1e-12))
    known = labels >= 0
    same = (labels[:, None] == labels[None, :]) & known[:, None] & known[None, :]
    eye = torch.eye(batch, dtype=torch.bool, device=labels.device)
    pos_ok = same & ~eye & comparable
    neg_ok = ~same & known[:, None] & known[None, :] & comparable
    valid = pos_ok.any(1) & neg_ok.any(1)
    empty = {"anchors": valid.nonzero().flatten(), "positives": labels.new_empty(0), "negatives": labels.new_empty(0)}
    if not bool(valid.any()):
        # no anchor has both a positive and a negative (e.g. every type appears once): no triplet term
        return sum(e.sum() for e in embeds.values()) * 0.0, empty
    positives = dist.masked_fill(~pos_ok, float("-inf")).argmax(1)
    negatives = dist.masked_fill(~neg_ok, float("inf")).argmin(1)
    rows = torch.arange(batch, device=labels.device)
    losses = F.relu(dist[rows, positives] - dist[rows, negatives] + margin)
    anchors = valid.nonzero().flatten()
    return losses[anchors].mean(), {"anchors": anchors, "positives": positives[anchors], "negatives": negatives[anchors]}


class MStarPreTrainedModel(PreTrainedModel):
    config_class = MStarConfig
    base_model_prefix = "mstar"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MStarTransLayer", "MStarPerformerLayer"]

    def _init_weights(self, module):
        # sub-models dispatch to their own `_init_weights`; this covers the projections and the scale
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MStarModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


class MStarModel(MStarPreTrainedModel):
    r"""
    The multimodal mSTAR model, with a CLIP-style API.

    Sub-models: `patch_model` ([`MStarPatchModel`]), `aggregator` ([`MStarSlideAggregator`]), `text_model`
    (`AutoModel.from_config(config.text_config)`, BioBERT in the paper), `rna_model` ([`MStarGeneEncoder`]).
    Projections into `projection_dim`: `slide_projection` (aggregator space -> shared), `text_projection`
    (the last layer's [CLS] -> shared), `rna_projection` (class token -> shared) and `patch_projection`
    (patch encoder width -> aggregator width, the Stage 2 student head).

    Forward (every modality optional; presence masks say which cases have it):
        patch_features (`[B, N, D]`), patch_attention_mask (`[B, N]`): a slide's patch features.
        input_ids, attention_mask, token_type_ids (`[B, T]`): the tokenised report.
        rna_bins, rna_mask (`[B, G]`): binned expression from the processor.
        slide_present, report_present, rna_present (`[B]` bool): defaults: all True when that input is given.
        cancer_type (`[B]` long): cancer-type index per case (-1 unknown), for the triplet loss.
        return_loss (`bool`): compute the Stage 1 loss.
    """

    def __init__(self, config: MStarConfig):
        super().__init__(config)
        self.patch_model = MStarPatchModel(config.patch_config)
        if config.patch_config.hidden_size != config.aggregator_config.input_dim:
            raise ValueError(
                f"MStarConfig: the patch encoder gives {config.patch_config.hidden_size}-d features but the aggregator "
                f"takes {config.aggregator_config.input_dim}-d ones; set aggregator_config.input_dim to match."
            )
        self.aggregator = MStarSlideAggregator(config.aggregator_config)
        self.text_model = AutoModel.from_config(config.text_config, add_pooling_layer=False) if getattr(
            config.text_config, "model_type", None
        ) in ("bert", "roberta", "xlm-roberta") else AutoModel.from_config(config.text_config)
        self.rna_model = MStarGeneEncoder(config.gene_config)
        dim = config.projection_dim
        agg_width = config.aggregator_config.hidden_size
        self.slide_projection = nn.Linear(agg_width, dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, dim, bias=False)
        self.rna_projection = nn.Linear(config.gene_config.hidden_size, dim, bias=False)
        self.patch_projection = nn.Linear(config.patch_config.hidden_size, agg_width)
        # shape [1], not a 0-d scalar: DeepSpeed's parameter broadcast cannot view 0-d tensors as bytes
        self.logit_scale = nn.Parameter(torch.tensor([config.logit_scale_init_value]))
        self.post_init()

    # ----- building from parts -----
    @classmethod
    def from_submodels(
        cls,
        patch: MStarPatchModel | MStarPatchConfig | str | None = None,
        aggregator: MStarSlideAggregator | MStarSlideAggregatorConfig | str | None = None,
        text: PreTrainedModel | PreTrainedConfig | str | None = None,
        rna: MStarGeneEncoder | MStarGeneConfig | str | None = None,
        **config_kwargs,
    ) -> "MStarModel":
        """Assembles an `MStarModel` from sub-models, like `VisionTextDualEncoderModel.from_vision_text_pretrained`.

        Each part is a model instance or a `save_pretrained` path / Hub id (its weights are copied), a
        config (fresh weights of that shape), or None (the default config, fresh weights). The
        projections are new. `config_kwargs` go to `MStarConfig`.
        """
        parts = {"patch": patch, "aggregator": aggregator, "text": text, "rna": rna}
        loaders = {"patch": MStarPatchModel, "aggregator": MStarSlideAggregator, "text": AutoModel, "rna": MStarGeneEncoder}
        loaded = {
            name: None if part is None or isinstance(part, PreTrainedConfig) else _load_part(part, loaders[name])
            for name, part in parts.items()
        }
        configs = {
            name: loaded[name].config if loaded[name] is not None else parts[name]  # config or None
            for name in parts
        }
        config = MStarConfig(
            patch_config=configs["patch"] or MStarPatchConfig(),
            aggregator_config=configs["aggregator"] or MStarSlideAggregatorConfig(),
            text_config=configs["text"],
            gene_config=configs["rna"] or MStarGeneConfig(),
            **config_kwargs,
        )
        model = cls(config)
        for name, attr in (("patch", "patch_model"), ("aggregator", "aggregator"), ("text", "text_model"), ("rna", "rna_model")):
            if loaded[name] is not None:
                incompatible = getattr(model, attr).load_state_dict(loaded[name].state_dict(), strict=False)
                if incompatible.missing_keys:
                    raise ValueError(f"from_submodels: the {name} model lacks weights {incompatible.missing_keys}.")
        return model

    # ----- per-modality embeddings -----
    def get_slide_features(
        self, patch_features: torch.Tensor, patch_attention_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """Slide embeddings in the shared space `[B, projection_dim]` from patch features `[B, N, D]`."""
        embeds = self.slide_projection(self.aggregator(patch_features, patch_attention_mask).slide_embeds)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        normalize: bool = False,
    ) -> torch.Tensor:
        """Report/prompt embeddings `[B, projection_dim]` from the last layer's [CLS] token."""
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.text_model(input_ids=input_ids, **kwargs).last_hidden_state[:, 0]
        embeds = self.text_projection(hidden)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def get_rna_features(
        self, rna_bins: torch.Tensor, rna_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """RNA-Seq embeddings `[B, projection_dim]` from binned expression `[B, G]`."""
        embeds = self.rna_projection(self.rna_model(rna_bins, rna_mask).pooler_output)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def get_patch_features(
        self,
        pixel_values: torch.Tensor | None = None,
        patch_features: torch.Tensor | None = None,
        space: str = "shared",
        normalize: bool = False,
    ) -> torch.Tensor:
        """Per-patch embeddings from images `[B, 3, H, W]` or encoder features `[..., D]`.

        `space="encoder"`: the patch encoder's class token (1024-d); `"aggregator"`: through
        `patch_projection` into the aggregator's token space (the Stage 2 student output); `"shared"`:
        further through `slide_projection` into the multimodal space (for zero-shot with text).
        """
        if patch_features is None:
            if pixel_values is None:
                raise ValueError("get_patch_features needs pixel_values or patch_features.")
            patch_features = self.patch_model(pixel_values).pooler_output
        if patch_features.shape[-1] != self.patch_projection.in_features:
            raise ValueError(
                f"get_patch_features: wrong feature width: expected {self.patch_projection.in_features}, "
                f"got {patch_features.shape[-1]}."
            )
        if space not in ("encoder", "aggregator", "shared"):
            raise ValueError(f"space must be 'encoder', 'aggregator' or 'shared', got {space!r}.")
        embeds = patch_features
        if space != "encoder":
            embeds = self.patch_projection(embeds)
        if space == "shared":
            embeds = self.slide_projection(embeds)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    # ----- Stage 1 forward -----
    def forward(
        self,
        patch_features: torch.Tensor | None = None,
        patch_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        rna_bins: torch.Tensor | None = None,
        rna_mask: torch.Tensor | None = None,
        slide_present: torch.Tensor | None = None,
        report_present: torch.Tensor | None = None,
        rna_present: torch.Tensor | None = None,
        cancer_type: torch.Tensor | None = None,
        return_loss: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MStarOutput | tuple:
        inputs = {"slide": patch_features, "report": input_ids, "rna": rna_bins}
        batch_sizes = {name: t.shape[0] for name, t in inputs.items() if t is not None}
        if not batch_sizes:
            raise ValueError("MStarModel.forward needs at least one of patch_features, input_ids, rna_bins.")
        if len(set(batch_sizes.values())) > 1:
            raise ValueError(f"MStarModel.forward: the modalities disagree on the batch size: {batch_sizes}.")
        batch = next(iter(batch_sizes.values()))
        device = self.logit_scale.device
        present = {}
        for name, given in (("slide", slide_present), ("report", report_present), ("rna", rna_present)):
            if given is None:
                given = torch.full((batch,), inputs[name] is not None, dtype=torch.bool, device=device)
            elif tuple(given.shape) != (batch,):
                raise ValueError(f"{name}_present must have shape [{batch}], got {tuple(given.shape)}.")
            elif inputs[name] is None and bool(given.any()):
                raise ValueError(f"{name}_present marks cases as present but no {name} input was given.")
            present[name] = given.to(device=device, dtype=torch.bool)

        # Each encoder runs only on the cases that have its modality; absent rows stay zero and take no
        # part in any loss, so they contribute no gradient.
        embeds = {}
        encoders = {
            "slide": lambda rows: self.get_slide_features(
                patch_features[rows], None if patch_attention_mask is None else patch_attention_mask[rows], normalize=True
            ),
            "report": lambda rows: self.get_text_features(
                input_ids[rows],
                None if attention_mask is None else attention_mask[rows],
                None if token_type_ids is None else token_type_ids[rows],
                normalize=True,
            ),
            "rna": lambda rows: self.get_rna_features(rna_bins[rows], None if rna_mask is None else rna_mask[rows], normalize=True),
        }
        dtype = self.slide_projection.weight.dtype
        for name in MODALITIES:
            out = torch.zeros(batch, self.config.projection_dim, device=device, dtype=dtype)
            rows = present[name].nonzero().flatten()
            if len(rows):
                out = out.index_copy(0, rows, encoders[name](rows).to(dtype))
            embeds[name] = out

        scale = self.logit_scale.clamp(max=4.6052).exp()[0]  # CLIP's clamp at 100
        logits, pair_losses = {}, {}
        for a, b in PAIRS:
            logits[f"{a}_{b}"] = scale * embeds[a] @ embeds[b].T
            rows = (present[a] & present[b]).nonzero().flatten()
            if len(rows) >= 2:  # a single pair has no negative: nothing to contrast
                pair_losses[f"{a}_{b}"], _ = symmetric_info_nce(embeds[a][rows], embeds[b][rows], scale)

        loss = contrastive = triplet = None
        if return_loss:
            zero = sum(e.sum() for e in embeds.values()) * 0.0 + self.logit_scale * 0.0
            contrastive = torch.stack(list(pair_losses.values())).mean() if pair_losses else zero
            if cancer_type is not None:
                triplet, _ = batch_hard_triplet_loss(embeds, present, cancer_type.to(device), self.config.triplet_margin)
            else:
                triplet = zero
            loss = self.config.contrastive_loss_weight * contrastive + self.config.triplet_loss_weight * triplet

        output = MStarOutput(
            loss=loss,
            contrastive_loss=contrastive,
            triplet_loss=triplet,
            pair_losses=pair_losses,
            logits_slide_report=logits["slide_report"],
            logits_slide_rna=logits["slide_rna"],
            logits_report_rna=logits["report_rna"],
            slide_embeds=embeds["slide"],
            text_embeds=embeds["report"],
            rna_embeds=embeds["rna"],
            slide_present=present["slide"],
            report_present=present["report"],
            rna_present=present["rna"],
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


def _load_part(part, loader):
    if part is None or isinstance(part, nn.Module):
        return part
    return loader.from_pretrained(part)


__all__ = ["MStarModel", "MStarOutput", "MStarPreTrainedModel", "batch_hard_triplet_loss", "symmetric_info_nce"]
