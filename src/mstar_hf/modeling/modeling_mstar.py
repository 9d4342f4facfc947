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
from transformers.modeling_outputs import BaseModelOutputWithPooling
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
    loss (`torch.FloatTensor` scalar, *optional*): weighted contrastive + triplet (+ patch alignment) loss
        (`return_loss=True`).
    contrastive_loss (`torch.FloatTensor` scalar): mean of the symmetric InfoNCE of the pairs that had cases.
    triplet_loss (`torch.FloatTensor` scalar): batch-hard inter-cancer triplet loss (0 if no valid triplet).
    pair_losses (`dict[str, torch.FloatTensor]`): InfoNCE per pair, keys like `"slide_report"`.
    patch_alignment_loss (`torch.FloatTensor` scalar, *optional*): InfoNCE between the slides' mean normalised
        projected patch tokens and the reports (only with `config.patch_alignment_loss_weight > 0`).
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
    patch_alignment_loss: torch.FloatTensor | None = None
    logits_slide_report: torch.FloatTensor | None = None
    logits_slide_rna: torch.FloatTensor | None = None
    logits_report_rna: torch.FloatTensor | None = None
    slide_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    rna_embeds: torch.FloatTensor | None = None
    slide_present: torch.BoolTensor | None = None
    report_present: torch.BoolTensor | None = None
    rna_present: torch.BoolTensor | None = None


def symmetric_info_nce(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, groups: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP loss between matched rows of L2-normalised `a` and `b` [n, P]; returns (loss, logits).

    `groups` [n] (e.g. the case of each row): rows of one group are never each other's negatives (two
    slides of one patient share its report and RNA), so those off-diagonal logits are masked out.
    """
    logits = logit_scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    if groups is not None:
        same = (groups[:, None] == groups[None, :]) & ~torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
        logits = logits.masked_fill(same, float("-inf"))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2, logits


def _negative_groups(case_index, cancer_type, negatives: str, batch: int, device) -> torch.Tensor | None:
    """Group ids [B] for `symmetric_info_nce`: rows of one case never negatives of each other, and with
    `negatives="other_cancer"` neither are rows of one known cancer type (unknown types, -1, stay apart)."""
    if negatives != "other_cancer" or cancer_type is None:
        return case_index
    case = case_index if case_index is not None else torch.arange(batch, device=device)
    known = cancer_type >= 0
    # a known type maps to its own id; an unknown one keeps its case id, shifted past every type id
    return torch.where(known, cancer_type.long(), case.long() + int(cancer_type.max().clamp(min=0)) + 1)


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient of the gathered tensor (an all_reduce, which
    every backend has) and keeps this process's slice."""

    @staticmethod
    def forward(ctx, tensor):
        import torch.distributed as dist

        rank, world = _world()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_batch(tensor: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Concatenates every process's `tensor` along dim 0 (rank order), so that a loss sees the global batch.

    As open_clip's `gather_with_grad=True`: the gather is differentiable and its backward sums what every
    process's (identical) loss sends to this process's rows; with DDP's gradient averaging the parameters
    then get exactly the gradient of the global-batch loss. Batches of different sizes (a short last
    batch) are padded for the collective and trimmed after. Outside torch.distributed: `tensor` itself.
    """
    import torch.distributed as dist

    _, world = _world()
    if world == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = tensor
    if max(sizes) > tensor.shape[0]:
        pad = tensor.new_zeros((max(sizes) - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad])
    is_bool = padded.dtype == torch.bool
    if is_bool:  # collectives move numbers
        padded = padded.to(torch.uint8)
    if with_grad and padded.requires_grad:
        parts = list(_AllGatherWithGrad.apply(padded).chunk(world))
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
    out = torch.cat([part[:n] for part, n in zip(parts, sizes)])
    return out.bool() if is_bool else out


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
    # `attn_implementation` ("sdpa" by default, "eager") reaches the sub-models that have a softmax-attention
    # backend: the text encoder and the patch encoder (timm). The aggregator (Nystrom) and the gene encoder
    # (FAVOR+) compute their own attention approximations and always run as they are ("eager").
    _supports_sdpa = True
    _fixed_attention_sub_configs = ("aggregator_config", "gene_config")

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
        report_hidden (`[B, text hidden]`): the text encoder's last-layer [CLS] per case, precomputed when the
            text encoder is frozen (Stage 1 then encodes each report once, not every step); replaces the text
            encoder's forward, `input_ids` still give the batch size and presence.
        case_index (`[B]` long): an id per patient case; rows of one case are never each other's InfoNCE
            negatives (several slides of a patient share its report and RNA).
        return_loss (`bool`): compute the Stage 1 loss.
        gather_across_processes (`bool`, default True): under torch.distributed the losses see the global
            batch (embeddings gathered from every process with gradient); False: this process's batch only.
    """

    def __init__(self, config: MStarConfig):
        super().__init__(config)
        for name in self._fixed_attention_sub_configs:
            getattr(config, name)._attn_implementation = "eager"
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

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False):
        """As `PreTrainedModel.set_attn_implementation`; a single name applies to the text and patch encoders
        (the aggregator and the gene encoder have no attention backend to choose)."""
        if isinstance(attn_implementation, str):
            attn_implementation = {"": attn_implementation, "text_config": attn_implementation,
                                   "patch_config": attn_implementation,
                                   **{name: "eager" for name in self._fixed_attention_sub_configs}}
        return super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)

    # ----- per-modality embeddings -----
    # As `CLIPModel.get_text_features` / `get_image_features` in transformers 5: each returns a
    # `BaseModelOutputWithPooling` whose `pooler_output` is the projected, unnormalised embedding
    # `[B, projection_dim]` and whose `last_hidden_state` holds the sub-model's tokens (a tuple with
    # `return_dict=False`). The earlier call form with `normalize=True|False` still returns the bare
    # embedding tensor (L2-normalised when True), so existing callers keep working.
    def _features_output(self, embeds, last_hidden_state=None, hidden_states=None, attentions=None,
                         normalize: bool | None = None, return_dict: bool | None = None):
        if normalize is not None:
            return F.normalize(embeds, dim=-1) if normalize else embeds
        output = BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=embeds,
                                            hidden_states=hidden_states, attentions=attentions)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def get_slide_features(
        self,
        patch_features: torch.Tensor,
        patch_attention_mask: torch.Tensor | None = None,
        normalize: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple | torch.Tensor:
        """Slide embeddings from patch features `[B, N, D]` (cast to the model's dtype).

        Returns `pooler_output` `[B, projection_dim]` (the projected aggregator class token) and
        `last_hidden_state` `[B, N, hidden_size]` (the aggregator's context-aware patch tokens).
        """
        out = self.aggregator(patch_features.to(self.dtype), patch_attention_mask)
        return self._features_output(self.slide_projection(out.slide_embeds), out.patch_embeds,
                                     normalize=normalize, return_dict=return_dict)

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        normalize: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple | torch.Tensor:
        """Report/prompt embeddings from token ids `[B, T]`: `pooler_output` `[B, projection_dim]` is the
        projected last-layer [CLS] token, `last_hidden_state` `[B, T, text hidden]` the text encoder's tokens
        (`output_hidden_states` / `output_attentions` pass through to the text encoder)."""
        text_kwargs = {"attention_mask": attention_mask, **kwargs}
        if token_type_ids is not None:
            text_kwargs["token_type_ids"] = token_type_ids
        if position_ids is not None:
            text_kwargs["position_ids"] = position_ids
        out = self.text_model(input_ids=input_ids, return_dict=True, **text_kwargs)
        embeds = self.text_projection(out.last_hidden_state[:, 0])
        return self._features_output(embeds, out.last_hidden_state, out.hidden_states, out.attentions,
                                     normalize=normalize, return_dict=return_dict)

    def get_rna_features(
        self,
        rna_bins: torch.Tensor,
        rna_mask: torch.Tensor | None = None,
        normalize: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple | torch.Tensor:
        """RNA-Seq embeddings from binned expression `[B, G]`: `pooler_output` `[B, projection_dim]` (the
        projected class token), `last_hidden_state` the gene encoder's tokens."""
        out = self.rna_model(rna_bins, rna_mask, return_dict=True)
        return self._features_output(self.rna_projection(out.pooler_output), out.last_hidden_state,
                                     normalize=normalize, return_dict=return_dict)

    def get_patch_features(
        self,
        pixel_values: torch.Tensor | None = None,
        patch_features: torch.Tensor | None = None,
        space: str = "shared",
        normalize: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple | torch.Tensor:
        """Per-patch embeddings (the `get_image_features` of this model) from images `[B, 3, H, W]` or
        encoder features `[..., D]`; `pooler_output` `[..., width]`, and with images `last_hidden_state`
        holds the patch encoder's tokens.

        `space="encoder"`: the patch encoder's class token (1024-d); `"aggregator"`: through
        `patch_projection` into the aggregator's token space (the Stage 2 student output); `"shared"`:
        further through `slide_projection` into the multimodal space (for zero-shot with text).
        """
        if space not in ("encoder", "aggregator", "shared"):
            raise ValueError(f"space must be 'encoder', 'aggregator' or 'shared', got {space!r}.")
        tokens = None
        if patch_features is None:
            if pixel_values is None:
                raise ValueError("get_patch_features needs pixel_values or patch_features.")
            encoded = self.patch_model(pixel_values, return_dict=True)
            patch_features, tokens = encoded.pooler_output, encoded.last_hidden_state
        if patch_features.shape[-1] != self.patch_projection.in_features:
            raise ValueError(
                f"get_patch_features: wrong feature width: expected {self.patch_projection.in_features}, "
                f"got {patch_features.shape[-1]}."
            )
        embeds = patch_features.to(self.dtype)
        if space != "encoder":
            embeds = self.patch_projection(embeds)
        if space == "shared":
            embeds = self.slide_projection(embeds)
        return self._features_output(embeds, tokens, normalize=normalize, return_dict=return_dict)

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
        case_index: torch.Tensor | None = None,
        report_hidden: torch.Tensor | None = None,
        return_loss: bool | None = None,
        gather_across_processes: bool | None = None,
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
        align_patches = bool(return_loss) and self.config.patch_alignment_loss_weight > 0
        patch_means = {}

        def encode_slides(rows):
            mask = None if patch_attention_mask is None else patch_attention_mask[rows]
            if not align_patches:
                return self.get_slide_features(patch_features[rows], mask, normalize=True)
            out = self.aggregator(patch_features[rows].to(self.dtype), mask)
            tokens = F.normalize(self.slide_projection(out.patch_embeds), dim=-1)  # [b, N, P]
            valid = out.attention_mask.to(tokens.dtype).unsqueeze(-1)
            # not re-normalised: its dot product with a class embedding is the mean patch cosine (MI-Zero)
            patch_means["rows"] = (tokens * valid).sum(1) / valid.sum(1).clamp_min(1.0)
            return F.normalize(self.slide_projection(out.slide_embeds), dim=-1)

        encoders = {
            "slide": encode_slides,
            "report": lambda rows: (
                F.normalize(self.text_projection(report_hidden[rows].to(self.text_projection.weight.dtype)), dim=-1)
                if report_hidden is not None
                else self.get_text_features(
                    input_ids[rows],
                    None if attention_mask is None else attention_mask[rows],
                    None if token_type_ids is None else token_type_ids[rows],
                    normalize=True,
                )
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
            if name == "slide" and align_patches:
                means = torch.zeros(batch, self.config.projection_dim, device=device, dtype=dtype)
                if len(rows):
                    means = means.index_copy(0, rows, patch_means["rows"].to(dtype))
                patch_means["all"] = means

        scale = self.logit_scale.clamp(max=4.6052).exp()[0]  # CLIP's clamp at 100
        logits = {f"{a}_{b}": scale * embeds[a] @ embeds[b].T for a, b in PAIRS}

        loss = contrastive = triplet = patch_alignment = None
        pair_losses = {}
        if return_loss:
            # The losses see the global batch: under torch.distributed every process gathers the others'
            # embeddings (with gradient), so the negatives and the mined triplets are those of one large
            # batch, whatever the number of processes (`gather_across_processes=False`: this batch only).
            gather = gather_across_processes if gather_across_processes is not None else True
            # losses in fp32 whatever the model's precision (bf16 under DeepSpeed/AMP): the softmax over a
            # large batch and the triplet distances are numerically delicate, and `cdist` has no bf16 CPU kernel
            g_embeds, g_present = {k: v.float() for k, v in embeds.items()}, present
            g_means = patch_means["all"].float() if align_patches else None
            g_type = None if cancer_type is None else cancer_type.to(device)
            g_case = None if case_index is None else case_index.to(device)
            if gather and _world()[1] > 1:
                g_embeds = {k: gather_batch(v) for k, v in g_embeds.items()}
                g_means = None if g_means is None else gather_batch(g_means)
                g_present = {k: gather_batch(v, with_grad=False) for k, v in present.items()}
                g_type = None if g_type is None else gather_batch(g_type, with_grad=False)
                g_case = None if g_case is None else gather_batch(g_case, with_grad=False)
            scale = scale.float()
            groups = _negative_groups(g_case, g_type, self.config.contrastive_negatives, len(g_present["slide"]), device)
            for a, b in PAIRS:
                rows = (g_present[a] & g_present[b]).nonzero().flatten()
                if len(rows) >= 2:  # a single pair has no negative: nothing to contrast
                    pair_losses[f"{a}_{b}"], _ = symmetric_info_nce(
                        g_embeds[a][rows], g_embeds[b][rows], scale, None if groups is None else groups[rows]
                    )
            zero = sum(e.sum() for e in g_embeds.values()) * 0.0 + self.logit_scale.float() * 0.0
            contrastive = torch.stack(list(pair_losses.values())).mean() if pair_losses else zero
            if g_type is not None:
                triplet, _ = batch_hard_triplet_loss(g_embeds, g_present, g_type, self.config.triplet_margin)
            else:
                triplet = zero
            loss = self.config.contrastive_loss_weight * contrastive + self.config.triplet_loss_weight * triplet
            if align_patches:
                rows = (g_present["slide"] & g_present["report"]).nonzero().flatten()
                if len(rows) >= 2:
                    patch_alignment, _ = symmetric_info_nce(g_means[rows], g_embeds["report"][rows], scale,
                                                            None if groups is None else groups[rows])
                else:
                    patch_alignment = zero
                loss = loss + self.config.patch_alignment_loss_weight * patch_alignment

        output = MStarOutput(
            loss=loss,
            contrastive_loss=contrastive,
            triplet_loss=triplet,
            pair_losses=pair_losses,
            patch_alignment_loss=patch_alignment,
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
