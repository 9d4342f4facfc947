"""mSTAR report generation: slide patch features -> region tokens -> a causal LM with cross-attention.

The slide side follows HistGen's local-global design on top of mSTAR features: the TransMIL aggregator
re-embeds every patch in whole-slide context; patches are grouped into spatial regions (consecutive
patches along a Hilbert curve over the patch grid, `region_size` each), pooled within a region, and
a few transformer layers mix [slide token; region tokens]. The decoder is any transformers causal LM
with cross-attention (GPT-2 by default), so `generate()` works with greedy, beam and sampling decoding.

Only imports torch, transformers and sibling files (copied next to checkpoints for `trust_remote_code`).
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_mstar_report import MStarReportGenerationConfig
from .modeling_mstar_aggregator import MStarSlideAggregator
from .modeling_mstar_patch import MStarPatchModel

# the paper's decoding (HistGen): beam search with 3 beams, reports of at most 100 tokens
GENERATION_DEFAULTS = {"num_beams": 3, "max_new_tokens": 100}


@dataclass
class MStarReportEncoderOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `[B, 1 + R, decoder_hidden_size]`):
        The tokens the decoder cross-attends to: the slide token, then up to R region tokens (R = the most
        regions of a slide in the batch), projected to the decoder width. Padded rows are zero.
    attention_mask (`torch.LongTensor` of shape `[B, 1 + R]`):
        1 for real tokens, 0 for the padding of slides with fewer regions.
    slide_embeds (`torch.FloatTensor` of shape `[B, aggregator_hidden_size]`):
        The aggregator's slide embedding (its class token), e.g. for nearest-neighbour retrieval.
    region_ids (`torch.LongTensor` of shape `[B, N]`):
        The region of every input patch (-1 for masked patches).
    """

    last_hidden_state: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    slide_embeds: torch.FloatTensor | None = None
    region_ids: torch.LongTensor | None = None


@dataclass
class MStarReportGenerationOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` scalar, *optional*): token cross-entropy against `labels` (ignoring -100), the mean
        over the batch's label tokens, or their sum over `num_items_in_batch` when that is given.
    logits (`torch.FloatTensor` of shape `[B, T, vocab_size]`): next-token scores of the decoder.
    cache (`Cache`, *optional*): the decoder's self- and cross-attention cache (used by `generate`).
    encoder_last_hidden_state (`torch.FloatTensor` of shape `[B, 1 + R, decoder_hidden_size]`): slide + region tokens.
    encoder_attention_mask (`torch.LongTensor` of shape `[B, 1 + R]`): which of them are real.
    slide_embeds (`torch.FloatTensor` of shape `[B, aggregator_hidden_size]`): the aggregator's slide embedding.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_attention_mask: torch.LongTensor | None = None
    slide_embeds: torch.FloatTensor | None = None


# ----- regions ---------------------------------------------------------------------------------------
def hilbert_index(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Position of integer grid cells (x, y >= 0) along the Hilbert curve of the smallest power-of-two
    square covering them. Consecutive positions are neighbouring cells, so chunks of the order are compact."""
    x, y = x.long().clone(), y.long().clone()
    side = 1
    if x.numel():
        extent = int(torch.maximum(x.max(), y.max())) + 1
        while side < extent:
            side *= 2
    d = torch.zeros_like(x)
    s = side // 2
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.long()) ^ ry.long())
        # rotate the quadrant so the sub-curve is traversed in the right orientation
        flip = rx & ~ry
        x = torch.where(flip, side - 1 - x, x)
        y = torch.where(flip, side - 1 - y, y)
        x, y = torch.where(~ry, y, x), torch.where(~ry, x, y)
        s //= 2
    return d


def patch_grid(coords: torch.Tensor) -> torch.Tensor:
    """Level-0 patch corners [n, 2] -> integer grid cells [n, 2] (the step is the smallest spacing seen)."""
    rel = coords.long() - coords.long().min(dim=0).values
    steps = []
    for axis in range(2):
        values = torch.unique(rel[:, axis])
        if len(values) > 1:
            steps.append(int((values[1:] - values[:-1]).min()))
    return rel // (min(steps) if steps else 1)


def assign_regions(coords: torch.Tensor | None, num_patches: int, num_regions: int, device=None) -> torch.Tensor:
    """Region index [n] of every patch: patches in Hilbert order (input order without coords) cut into
    `num_regions` chunks whose sizes differ by at most one."""
    device = coords.device if coords is not None else device
    if coords is None:
        order = torch.arange(num_patches, device=device)
    else:
        grid = patch_grid(coords)
        order = torch.argsort(hilbert_index(grid[:, 0], grid[:, 1]), stable=True)
    rank = torch.arange(num_patches, device=order.device)
    regions = torch.empty(num_patches, dtype=torch.long, device=order.device)
    regions[order] = rank * num_regions // max(num_patches, 1)
    return regions


class MStarRegionPooling(nn.Module):
    """Pools the patch tokens of each region into one token (gated attention as in ABMIL, or the mean)."""

    def __init__(self, config: MStarReportGenerationConfig):
        super().__init__()
        width = config.aggregator_config.hidden_size
        self.mode = config.region_pooling
        if self.mode == "attention":
            self.attention_v = nn.Linear(width, width // 2)
            self.attention_u = nn.Linear(width, width // 2)
            self.attention_w = nn.Linear(width // 2, 1)

    def forward(self, tokens: torch.Tensor, region_ids: torch.Tensor, num_regions: int) -> torch.Tensor:
        """tokens [M, H] with their region ids [M] in [0, num_regions) -> [num_regions, H]."""
        width = tokens.shape[-1]
        if self.mode == "mean":
            sums = tokens.new_zeros(num_regions, width).index_add(0, region_ids, tokens)
            counts = torch.bincount(region_ids, minlength=num_regions).clamp(min=1).to(tokens.dtype)
            return sums / counts[:, None]
        scores = self.attention_w(torch.tanh(self.attention_v(tokens)) * torch.sigmoid(self.attention_u(tokens)))
        scores = scores.squeeze(-1).float()
        with torch.no_grad():  # the shift only stabilises exp(); softmax does not depend on it
            peak = scores.new_full((num_regions,), float("-inf")).scatter_reduce(
                0, region_ids, scores, reduce="amax", include_self=True
            )
        weights = torch.exp(scores - peak[region_ids])
        denom = weights.new_zeros(num_regions).index_add(0, region_ids, weights)
        weights = (weights / denom[region_ids]).to(tokens.dtype)
        return tokens.new_zeros(num_regions, width).index_add(0, region_ids, tokens * weights[:, None])


class MStarRegionLayer(nn.Module):
    """Pre-LayerNorm transformer layer over [slide token; region tokens] with a key padding mask."""

    def __init__(self, config: MStarReportGenerationConfig):
        super().__init__()
        width = config.aggregator_config.hidden_size
        eps = config.aggregator_config.layer_norm_eps
        self.num_heads = config.region_num_heads
        self.dropout = config.region_dropout
        inner = config.region_intermediate_size or 4 * width
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, inner)
        self.fc2 = nn.Linear(inner, width)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, T, H], attention_mask [B, T] (True = real token) -> [B, T, H]."""
        batch, length, width = hidden_states.shape
        p = self.dropout if self.training else 0.0
        qkv = self.qkv(self.norm1(hidden_states)).view(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask.bool()[:, None, None, :], dropout_p=p)
        hidden_states = hidden_states + F.dropout(self.out_proj(attn.transpose(1, 2).flatten(2)), p, self.training)
        update = self.fc2(F.dropout(F.gelu(self.fc1(self.norm2(hidden_states))), p, self.training))
        return hidden_states + F.dropout(update, p, self.training)


class MStarReportEncoder(nn.Module):
    r"""
    Slide encoder of the report generator: aggregator -> regions -> region layers -> decoder width.

    Forward:
        patch_features (`torch.FloatTensor` of shape `[B, N, input_dim]`): patch features of B slides.
        patch_attention_mask (`torch.BoolTensor` of shape `[B, N]`, *optional*): True for real patches.
        patch_coords (`torch.LongTensor` of shape `[B, N, 2]`, *optional*): level-0 (x, y) of every patch;
            without them, regions are runs of consecutive patches in input order (HistGen's behaviour).

    Returns:
        [`MStarReportEncoderOutput`].
    """

    main_input_name = "patch_features"

    def __init__(self, config: MStarReportGenerationConfig):
        super().__init__()
        width = config.aggregator_config.hidden_size
        self.region_size = config.region_size
        self.aggregator = MStarSlideAggregator(config.aggregator_config)
        self.region_pooling = MStarRegionPooling(config)
        self.token_type_embeddings = nn.Embedding(2, width)  # 0: slide token, 1: region token
        self.layers = nn.ModuleList([MStarRegionLayer(config) for _ in range(config.num_region_layers)])
        self.norm = nn.LayerNorm(width, eps=config.aggregator_config.layer_norm_eps)
        self.projection = nn.Linear(width, config.text_config.hidden_size)

    def forward(
        self,
        patch_features: torch.Tensor,
        patch_attention_mask: torch.Tensor | None = None,
        patch_coords: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MStarReportEncoderOutput:
        agg = self.aggregator(patch_features, patch_attention_mask, return_dict=True)
        mask = agg.attention_mask
        batch, num = mask.shape
        if patch_coords is not None and (patch_coords.ndim != 3 or tuple(patch_coords.shape) != (batch, num, 2)):
            raise ValueError(
                f"MStarForReportGeneration: patch_coords must have shape [{batch}, {num}, 2] like patch_features, "
                f"got {tuple(patch_coords.shape)}."
            )
        counts = mask.sum(dim=1)
        num_regions = (counts + self.region_size - 1) // self.region_size  # [B]
        most = int(num_regions.max())
        region_ids = torch.full((batch, num), -1, dtype=torch.long, device=mask.device)
        for b in range(batch):
            rows = mask[b].nonzero().flatten()
            coords = None if patch_coords is None else patch_coords[b, rows]
            region_ids[b, rows] = assign_regions(coords, len(rows), int(num_regions[b]), device=mask.device)
        # one flat pooling call for the whole batch: region r of slide b is pooled slot b * most + r
        flat_ids = (region_ids + torch.arange(batch, device=mask.device)[:, None] * most)[mask]
        pooled = self.region_pooling(agg.patch_embeds[mask], flat_ids, batch * most).view(batch, most, -1)

        hidden = torch.cat([agg.slide_embeds[:, None], pooled], dim=1)
        types = torch.ones(1 + most, dtype=torch.long, device=hidden.device)
        types[0] = 0
        hidden = hidden + self.token_type_embeddings(types)[None].to(hidden.dtype)
        token_mask = torch.cat(
            [torch.ones(batch, 1, dtype=torch.bool, device=mask.device),
             torch.arange(most, device=mask.device)[None] < num_regions[:, None]],
            dim=1,
        )
        for layer in self.layers:
            hidden = layer(hidden, token_mask)
        hidden = self.projection(self.norm(hidden)) * token_mask[..., None].to(hidden.dtype)
        return MStarReportEncoderOutput(
            last_hidden_state=hidden,
            attention_mask=token_mask.long(),
            slide_embeds=agg.slide_embeds,
            region_ids=region_ids,
        )


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: [start, labels[:-1]] with -100 replaced by the pad token."""
    if decoder_start_token_id is None or pad_token_id is None:
        raise ValueError("MStarForReportGeneration needs config.decoder_start_token_id and config.pad_token_id.")
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


def build_report_labels(tokenizer, reports, max_length: int, eos_token_id: int | None = None) -> torch.Tensor:
    """Tokenised reports as decoder labels `[B, T]`: the report's tokens (at most `max_length - 1`), then
    the end token; -100 pads. Works with any tokenizer (special tokens of its own are not added)."""
    reports = list(reports)
    if not reports:
        raise ValueError("build_report_labels: empty report list.")
    empty = [i for i, r in enumerate(reports) if not isinstance(r, str) or not r.strip()]
    if empty:
        raise ValueError(f"build_report_labels: reports at index {empty} are empty or not strings.")
    if max_length < 2:
        raise ValueError(f"build_report_labels: max_length must be >= 2, got {max_length}.")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise ValueError("build_report_labels: the tokenizer has no eos token; pass eos_token_id.")
    ids = tokenizer(reports, add_special_tokens=False, truncation=True, max_length=max_length - 1)["input_ids"]
    labels = torch.full((len(ids), max(len(x) for x in ids) + 1), -100, dtype=torch.long)
    for i, seq in enumerate(ids):
        labels[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        labels[i, len(seq)] = eos
    return labels


class MStarReportPreTrainedModel(PreTrainedModel):
    config_class = MStarReportGenerationConfig
    base_model_prefix = "mstar_report"
    main_input_name = "patch_features"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["MStarTransLayer", "MStarRegionLayer"]
    _supports_sdpa = True
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        # the aggregator, decoder and patch model are PreTrainedModels and run their own `_init_weights`
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)


class MStarForReportGeneration(MStarReportPreTrainedModel, GenerationMixin):
    r"""
    Writes a pathology report from a slide's patch features (an encoder-decoder model for `generate()`).

    Sub-modules: `encoder` ([`MStarReportEncoder`]: `encoder.aggregator` is an [`MStarSlideAggregator`]),
    `decoder` (`AutoModelForCausalLM.from_config(config.text_config)`), and `patch_model`
    ([`MStarPatchModel`], only when `config.patch_config` is set: it lets a pipeline go from a slide file to
    a report with one folder).

    Forward:
        patch_features (`torch.FloatTensor` of shape `[B, N, input_dim]`): patch features.
        patch_attention_mask (`torch.BoolTensor` of shape `[B, N]`, *optional*): True for real patches.
        patch_coords (`torch.LongTensor` of shape `[B, N, 2]`, *optional*): level-0 patch coordinates.
        decoder_input_ids (`torch.LongTensor` of shape `[B, T]`, *optional*): decoder inputs; built from
            `labels` by shifting them right when not given.
        decoder_attention_mask (`torch.LongTensor` of shape `[B, T]`, *optional*).
        encoder_outputs ([`MStarReportEncoderOutput`], *optional*): reuse an encoded slide.
        labels (`torch.LongTensor` of shape `[B, T]`, *optional*): target tokens ending with the eos token,
            -100 where ignored (see [`build_report_labels`]).

    Returns:
        [`MStarReportGenerationOutput`].

    Example:
    ```python
    >>> reports = model.generate(patch_features, patch_coords=coords)  # beam 3, <= 100 new tokens by default
    >>> tokenizer.batch_decode(reports, skip_special_tokens=True)
    ```
    """

    def __init__(self, config: MStarReportGenerationConfig):
        super().__init__(config)
        self.encoder = MStarReportEncoder(config)
        decoder = AutoModelForCausalLM.from_config(config.text_config)
        # one config object for the decoder and the composite config, as in VisionEncoderDecoderModel
        config.text_config._attn_implementation = decoder.config._attn_implementation
        decoder.config = config.text_config
        self.decoder = decoder
        self.patch_model = MStarPatchModel(config.patch_config) if config.patch_config is not None else None
        self.post_init()
        for key, value in GENERATION_DEFAULTS.items():
            if getattr(self.generation_config, key, None) in (None, 1):
                setattr(self.generation_config, key, value)

    # ----- parts -----
    def get_encoder(self, modality: str | None = None):
        return self.encoder

    def get_decoder(self):
        return self.decoder

    def get_input_embeddings(self):
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.decoder.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.decoder.set_output_embeddings(new_embeddings)

    @property
    def aggregator(self) -> MStarSlideAggregator:
        return self.encoder.aggregator

    def init_aggregator_from(self, source) -> "MStarForReportGeneration":
        """Copies the slide aggregator weights from a Stage 1 `MStarModel`, an `MStarSlideAggregator`, or a
        `save_pretrained` folder / Hub id of either. The architectures must match."""
        if isinstance(source, (str, os.PathLike)):
            source = AutoModel.from_pretrained(source)
        aggregator = getattr(source, "aggregator", source)
        if not isinstance(aggregator, MStarSlideAggregator):
            raise TypeError(
                f"init_aggregator_from: expected an MStarModel or MStarSlideAggregator, got {type(source).__name__}."
            )
        mine, theirs = self.config.aggregator_config, aggregator.config
        for field in ("input_dim", "hidden_size", "num_attention_heads", "attention_head_dim", "num_landmarks"):
            if getattr(mine, field) != getattr(theirs, field):
                raise ValueError(
                    f"init_aggregator_from: aggregator {field} differs: this model has {getattr(mine, field)}, "
                    f"the source has {getattr(theirs, field)}; build the config from the source's aggregator_config."
                )
        self.encoder.aggregator.load_state_dict(aggregator.state_dict())
        return self

    def attach_patch_model(self, patch_model: MStarPatchModel) -> "MStarForReportGeneration":
        """Carries `patch_model` inside this model (saved with it), so that the folder alone turns slides
        into reports. Its width must be the aggregator's input width."""
        width = patch_model.config.hidden_size
        if width != self.config.aggregator_config.input_dim:
            raise ValueError(
                f"attach_patch_model: wrong feature width: the aggregator expects "
                f"{self.config.aggregator_config.input_dim}-d patch features, the patch model gives {width}-d."
            )
        self.config.patch_config = patch_model.config
        self.patch_model = patch_model.to(self.device)
        return self

    # ----- forward -----
    def forward(
        self,
        patch_features: torch.Tensor | None = None,
        patch_attention_mask: torch.Tensor | None = None,
        patch_coords: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: MStarReportEncoderOutput | None = None,
        cache=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> MStarReportGenerationOutput | tuple:
        r"""`num_items_in_batch`: the label tokens of the whole batch that one optimizer step averages over (every
        micro-batch of a gradient-accumulation window, on every process); the loss is then this micro-batch's
        summed cross-entropy over it, as transformers' models do, so that long and short reports weigh the same
        however they are split into micro-batches and processes."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if encoder_outputs is None:
            if patch_features is None:
                raise ValueError("MStarForReportGeneration.forward needs patch_features or encoder_outputs.")
            encoder_outputs = self.encoder(patch_features, patch_attention_mask, patch_coords)
        elif isinstance(encoder_outputs, tuple):
            encoder_outputs = MStarReportEncoderOutput(*encoder_outputs)
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
            if decoder_attention_mask is None:  # the start token, then every position whose input was a label
                decoder_attention_mask = torch.cat(
                    [torch.ones_like(labels[:, :1]), (labels[:, :-1] != -100).long()], dim=1
                )
        if decoder_input_ids is None:
            raise ValueError("MStarForReportGeneration.forward needs decoder_input_ids or labels (or use generate()).")
        if use_cache is None and labels is not None:
            use_cache = False  # teacher forcing needs no cache (and gradient checkpointing forbids one)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=encoder_outputs.attention_mask,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
        )
        logits = decoder_outputs.logits
        loss = None
        if labels is not None:
            flat = (logits.float().flatten(0, 1), labels.to(logits.device).flatten())
            if num_items_in_batch is None:
                loss = F.cross_entropy(*flat, ignore_index=-100)
            else:
                loss = F.cross_entropy(*flat, ignore_index=-100, reduction="sum") / num_items_in_batch
        output = MStarReportGenerationOutput(
            loss=loss,
            logits=logits,
            cache=getattr(decoder_outputs, "cache", None),
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_attention_mask=encoder_outputs.attention_mask,
            slide_embeds=encoder_outputs.slide_embeds,
        )
        return output if return_dict else output.to_tuple()

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor):
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `register_for_auto_class` records one Auto class; also map the pipelines' task class to this one, so a
        # folder saved here loads with either `AutoModel` or `AutoModelForImageTextToText` and trust_remote_code.
        if type(self)._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            name = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            auto_map.setdefault("AutoModelForImageTextToText", name)
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


__all__ = [
    "MStarForReportGeneration",
    "MStarReportEncoder",
    "MStarReportEncoderOutput",
    "MStarReportGenerationOutput",
    "MStarReportPreTrainedModel",
    "assign_regions",
    "build_report_labels",
    "hilbert_index",
    "shift_tokens_right",
]
