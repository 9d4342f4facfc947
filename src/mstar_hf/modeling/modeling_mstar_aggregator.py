"""mSTAR slide aggregator: TransMIL (Nystrom attention + PPEG) over a slide's patch features.

The attention is numerically the `nystrom-attention` package's `NystromAttention` (the module the
TransMIL reference uses; parameter names are kept so reference checkpoints map one to one), computed
in chunks so that no [N, landmarks] matrix larger than `chunk_size` rows exists at once: a 100k-patch
slide runs in a few GB. Only imports torch, transformers and sibling files (copied next to
checkpoints for `trust_remote_code`).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_mstar import MStarSlideAggregatorConfig


@dataclass
class MStarSlideAggregatorOutput(ModelOutput):
    r"""
    slide_embeds (`torch.FloatTensor` of shape `[B, hidden_size]`):
        The class token after the final LayerNorm: the slide embedding ("mSTAR+").
    patch_embeds (`torch.FloatTensor` of shape `[B, N, hidden_size]`):
        Every real patch re-embedded in whole-slide context, in input order (square-padding tokens
        removed). Rows where `attention_mask` is False are zero.
    attention_mask (`torch.BoolTensor` of shape `[B, N]`):
        Which rows of `patch_embeds` are real patches.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
        The patch tokens after each stage, each `[B, N, hidden_size]` in the layout of `patch_embeds`: the
        input projection, the first TransLayer, the PPEG, the second TransLayer (the last one is
        `patch_embeds` before the final LayerNorm).
    """

    slide_embeds: torch.FloatTensor | None = None
    patch_embeds: torch.FloatTensor | None = None
    attention_mask: torch.BoolTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def iterative_pinv(x: torch.Tensor, iters: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of `x` [B, h, m, m] by the Nystromformer iteration.

    The reference scales the initial guess by maxima over the whole batch; here they are taken per
    slide, so a slide gets the same result in any batch (identical to the reference for B=1).
    """
    abs_x = x.abs()
    col = abs_x.sum(dim=-1).flatten(1).amax(dim=1)
    row = abs_x.sum(dim=-2).flatten(1).amax(dim=1)
    z = x.transpose(-1, -2) / (col * row).view(-1, 1, 1, 1)
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - (xz @ (15 * eye - (xz @ (7 * eye - xz)))))
    return z


class MStarNystromAttention(nn.Module):
    """Nystrom self-attention (Xiong et al. 2021) with a depthwise-conv residual on the values."""

    def __init__(self, config: MStarSlideAggregatorConfig):
        super().__init__()
        dim, heads, head_dim = config.hidden_size, config.num_attention_heads, config.attention_head_dim
        self.heads, self.head_dim = heads, head_dim
        self.num_landmarks = config.num_landmarks
        self.pinv_iterations = config.pinv_iterations
        self.chunk_size = config.chunk_size
        self.scale = head_dim**-0.5
        self.to_qkv = nn.Linear(dim, heads * head_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * head_dim, dim), nn.Dropout(config.attention_dropout))
        k = config.residual_conv_kernel
        self.res_conv = nn.Conv2d(heads, heads, (k, 1), padding=(k // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, n, dim] (slides of equal length, no padding) -> [B, n, dim]."""
        b, n, _ = x.shape
        m, h, chunk = self.num_landmarks, self.heads, self.chunk_size
        # As the reference: left-pad with zero tokens to a multiple of the landmark count. The zero
        # tokens act as keys with zero logits, so they are part of the model's function.
        if n % m:
            x = F.pad(x, (0, 0, m - n % m, 0))
        length = x.shape[1]
        group = length // m
        q, k, v = (t.unflatten(-1, (h, self.head_dim)).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        del x
        # the 1/sqrt(d) scale is applied to the landmarks and per query chunk, never to a full copy of q
        q_land = q.unflatten(2, (m, group)).mean(dim=3) * self.scale  # [B, h, m, d]
        k_land = k.unflatten(2, (m, group)).mean(dim=3)
        attn2_inv = iterative_pinv((q_land @ k_land.transpose(-1, -2)).softmax(dim=-1), self.pinv_iterations)

        # softmax(q_land k^T) v over all tokens, accumulated chunk by chunk (online softmax)
        running_max = q_land.new_full((b, h, m, 1), float("-inf"))
        denom = q_land.new_zeros((b, h, m, 1))
        acc = q_land.new_zeros((b, h, m, self.head_dim))
        for start in range(0, length, chunk):
            sim = q_land @ k[:, :, start : start + chunk].transpose(-1, -2)
            new_max = torch.maximum(running_max, sim.amax(dim=-1, keepdim=True))
            correction = torch.exp(running_max - new_max)
            p = torch.exp(sim - new_max)
            denom = denom * correction + p.sum(dim=-1, keepdim=True)
            acc = acc * correction + p @ v[:, :, start : start + chunk]
            running_max = new_max
        context = attn2_inv @ (acc / denom)  # [B, h, m, d]
        k_land_t = k_land.transpose(-1, -2) * self.scale

        # residual conv of the values, then softmax(q k_land^T) @ context added query chunk by query chunk
        # (rows are independent), into one buffer instead of a list of chunks and a concatenation
        out = self.res_conv(v)
        del k, v
        for s in range(0, length, chunk):
            out[:, :, s : s + chunk] += (q[:, :, s : s + chunk] @ k_land_t).softmax(dim=-1) @ context
        del q
        out = self.to_out(out.transpose(1, 2).flatten(2))
        return out[:, -n:]

    @torch.no_grad()
    def add_to_(self, hidden_states: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """Inference only: `hidden_states += forward(norm(hidden_states))`, in place, the same numbers
        with ~4 [B, N, dim] buffers at the peak instead of ~9 (a 200k-patch slide in ~2 GB).

        LayerNorm + qkv projection run chunk by chunk into q and k|v buffers (the zero left-padding
        tokens stay zero rows); the value conv is written chunk by chunk over k, which is no longer
        needed by then; the output projection is added into `hidden_states` chunk by chunk.
        """
        b, n, dim = hidden_states.shape
        m, h, d, chunk = self.num_landmarks, self.heads, self.head_dim, self.chunk_size
        pad = (m - n % m) % m
        length = n + pad
        group = length // m
        inner = h * d
        q = hidden_states.new_zeros((b, length, inner))
        kv = hidden_states.new_zeros((b, length, 2 * inner))
        w_q, w_kv = self.to_qkv.weight[:inner], self.to_qkv.weight[inner:]
        for s in range(0, n, chunk):
            x = norm(hidden_states[:, s : s + chunk])
            q[:, pad + s : pad + s + chunk] = F.linear(x, w_q)
            kv[:, pad + s : pad + s + chunk] = F.linear(x, w_kv)
        del x
        q = q.unflatten(-1, (h, d)).transpose(1, 2)  # [B, h, L, d] views
        k, v = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in kv.chunk(2, dim=-1))

        q_land = q.unflatten(2, (m, group)).mean(dim=3) * self.scale
        k_land = k.unflatten(2, (m, group)).mean(dim=3)
        attn2_inv = iterative_pinv((q_land @ k_land.transpose(-1, -2)).softmax(dim=-1), self.pinv_iterations)
        running_max = q_land.new_full((b, h, m, 1), float("-inf"))
        denom = q_land.new_zeros((b, h, m, 1))
        acc = q_land.new_zeros((b, h, m, d))
        for start in range(0, length, chunk):
            sim = q_land @ k[:, :, start : start + chunk].transpose(-1, -2)
            new_max = torch.maximum(running_max, sim.amax(dim=-1, keepdim=True))
            correction = torch.exp(running_max - new_max)
            p = torch.exp(sim - new_max)
            denom = denom * correction + p.sum(dim=-1, keepdim=True)
            acc = acc * correction + p @ v[:, :, start : start + chunk]
            running_max = new_max
        context = attn2_inv @ (acc / denom)
        k_land_t = k_land.transpose(-1, -2) * self.scale

        # depthwise conv along the sequence, chunk by chunk with a halo, written over k
        weight, half = self.res_conv.weight, self.res_conv.kernel_size[0] // 2
        out = k
        for s in range(0, length, chunk):
            e = min(length, s + chunk)
            lo, hi = max(0, s - half), min(length, e + half)
            piece = F.conv2d(v[:, :, lo:hi], weight, padding=(half, 0), groups=h)
            out[:, :, s:e] = piece[:, :, s - lo : s - lo + (e - s)]
        del v
        for s in range(0, length, chunk):
            out[:, :, s : s + chunk] += (q[:, :, s : s + chunk] @ k_land_t).softmax(dim=-1) @ context
        del q
        for s in range(0, n, chunk):
            rows = out[:, :, pad + s : pad + s + chunk].transpose(1, 2).flatten(2)
            hidden_states[:, s : s + chunk] += self.to_out(rows)
        return hidden_states


class MStarTransLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm Nystrom attention with a residual add (TransMIL has no feed-forward block)."""

    def __init__(self, config: MStarSlideAggregatorConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = MStarNystromAttention(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # In place and chunked only for true inference (a 200k-patch slide in ~2 GB). Reentrant
        # checkpointing runs this forward without grad and later replays it from the same input
        # tensor, so an in-place add there would corrupt the input the replay reads.
        # DeepSpeed ZeRO-3 partitions parameters and gathers them only around module calls, while `add_to_`
        # reads the qkv weight directly: partitioned weights (`ds_id`) take the plain path.
        partitioned = hasattr(self.attn.to_qkv.weight, "ds_id")
        if torch.is_grad_enabled() or (self.gradient_checkpointing and self.training) or partitioned:
            return hidden_states + self.attn(self.norm(hidden_states))
        return self.attn.add_to_(hidden_states, self.norm)


class MStarPPEG(nn.Module):
    """Pyramid position encoding generator: depthwise convs over the square grid of patch tokens."""

    def __init__(self, config: MStarSlideAggregatorConfig):
        super().__init__()
        dim = config.hidden_size
        kernels = config.ppeg_kernels
        # named proj, proj1, proj2 as in TransMIL
        for i, k in enumerate(kernels):
            self.add_module("proj" if i == 0 else f"proj{i}", nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim))
        self.num_convs = len(kernels)

    def forward(self, hidden_states: torch.Tensor, side: int) -> torch.Tensor:
        cls_token, tokens = hidden_states[:, :1], hidden_states[:, 1:]
        grid = tokens.transpose(1, 2).unflatten(2, (side, side))
        out = grid.clone()
        for i in range(self.num_convs):
            out += getattr(self, "proj" if i == 0 else f"proj{i}")(grid)
        return torch.cat([cls_token, out.flatten(2).transpose(1, 2)], dim=1)


class MStarSlideAggregatorPreTrainedModel(PreTrainedModel):
    config_class = MStarSlideAggregatorConfig
    base_model_prefix = "aggregator"
    main_input_name = "patch_features"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MStarTransLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MStarSlideAggregator):
            init.normal_(module.cls_token, mean=0.0, std=std)


def check_patch_features(patch_features: torch.Tensor, attention_mask: torch.Tensor | None, input_dim: int, who: str):
    """Validates a bag batch; raises ValueError naming the problem (never broadcasts silently)."""
    if patch_features.ndim != 3:
        raise ValueError(f"{who} expects patch_features of shape [B, N, {input_dim}], got {tuple(patch_features.shape)}.")
    batch, num, width = patch_features.shape
    if width != input_dim:
        raise ValueError(f"{who}: wrong feature width: expected {input_dim}-d patch features, got {width}-d.")
    if num == 0:
        raise ValueError(f"{who}: empty bag: patch_features has 0 patches.")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, num):
            raise ValueError(
                f"{who}: attention_mask has shape {tuple(attention_mask.shape)} but patch_features is "
                f"{tuple(patch_features.shape)}; expected [{batch}, {num}]."
            )
        empty = (~attention_mask.bool()).all(dim=1).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"{who}: empty bag: slides at batch index {empty} have no unmasked patch.")
    finite = torch.isfinite(patch_features).all(dim=-1)
    if attention_mask is not None:
        finite = finite | ~attention_mask.bool()
    bad = (~finite.all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{who}: NaN or inf in the patch features of the slides at batch index {bad}.")


class MStarSlideAggregator(MStarSlideAggregatorPreTrainedModel):
    r"""
    TransMIL, as pretrained by mSTAR: Linear(input_dim -> hidden) + ReLU + Dropout; square padding by
    repeating the first tokens; a class token; TransLayer; PPEG; TransLayer; LayerNorm.

    Forward:
        patch_features (`torch.FloatTensor` of shape `[B, N, input_dim]`): patch features of B slides.
        attention_mask (`torch.BoolTensor` of shape `[B, N]`, *optional*): True for real patches. Slides
            of different lengths are each computed on their own real patches, so a slide's result does
            not depend on the batch it is in.
        output_hidden_states (`bool`, *optional*): also return the patch tokens after each stage.

    Returns:
        [`MStarSlideAggregatorOutput`] with `slide_embeds` `[B, hidden_size]`, `patch_embeds`
        `[B, N, hidden_size]` and, if asked, `hidden_states` (4 x `[B, N, hidden_size]`).
    """

    def __init__(self, config: MStarSlideAggregatorConfig):
        super().__init__(config)
        self.input_proj = nn.Sequential(
            nn.Linear(config.input_dim, config.hidden_size), nn.ReLU(), nn.Dropout(config.input_dropout)
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.layers = nn.ModuleList([MStarTransLayer(config), MStarTransLayer(config)])
        self.ppeg = MStarPPEG(config)
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def _encode(self, features: torch.Tensor, output_hidden_states: bool = False):
        """features [B, n, input_dim] of equal-length slides -> ([B, hidden], [B, n, hidden], stages), where
        `stages` holds the patch rows [B, n, hidden] after each stage if asked, else is empty."""
        hidden = self.input_proj(features)
        n = hidden.shape[1]
        side = math.isqrt(n)
        side += side * side < n
        cls_token = self.cls_token.expand(hidden.shape[0], -1, -1).to(hidden.dtype)
        hidden = torch.cat([cls_token, hidden, hidden[:, : side * side - n]], dim=1)
        stages = []
        # copies: at inference the TransLayers add into their input in place
        keep = (lambda h: stages.append(h[:, 1 : n + 1].clone())) if output_hidden_states else (lambda h: None)
        keep(hidden)
        hidden = self.layers[0](hidden)
        keep(hidden)
        hidden = self.ppeg(hidden, side)
        keep(hidden)
        hidden = self.layers[1](hidden)
        keep(hidden)
        hidden = self.final_norm(hidden)
        return hidden[:, 0], hidden[:, 1 : n + 1], tuple(stages)

    def forward(
        self,
        patch_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MStarSlideAggregatorOutput | tuple:
        check_patch_features(patch_features, attention_mask, self.config.input_dim, type(self).__name__)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        batch, num, _ = patch_features.shape
        if attention_mask is None or bool(attention_mask.all()):
            slide_embeds, patch_embeds, stages = self._encode(patch_features, output_hidden_states)
            mask = torch.ones(batch, num, dtype=torch.bool, device=patch_features.device)
        else:
            mask = attention_mask.bool()
            lengths = mask.sum(dim=1)
            slide_embeds = patch_features.new_zeros(batch, self.config.hidden_size)
            patch_embeds = patch_features.new_zeros(batch, num, self.config.hidden_size)
            stages = [patch_embeds.clone() for _ in range(4)] if output_hidden_states else []
            # slides with the same number of real patches run together; each group is unpadded
            for length in lengths.unique().tolist():
                rows = (lengths == length).nonzero().flatten()
                bags = patch_features[rows][mask[rows]].view(len(rows), length, -1)
                group_slide, group_patches, group_stages = self._encode(bags, output_hidden_states)
                slide_embeds = slide_embeds.index_copy(0, rows, group_slide.to(slide_embeds.dtype))

                def scatter(full, group):
                    scattered = full[rows].masked_scatter(mask[rows, :, None], group.to(full.dtype))
                    return full.index_copy(0, rows, scattered)

                patch_embeds = scatter(patch_embeds, group_patches)
                stages = [scatter(full, group) for full, group in zip(stages, group_stages)]
        hidden_states = tuple(stages) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (slide_embeds, patch_embeds, mask, hidden_states) if v is not None)
        return MStarSlideAggregatorOutput(slide_embeds=slide_embeds, patch_embeds=patch_embeds, attention_mask=mask,
                                          hidden_states=hidden_states)


__all__ = [
    "MStarSlideAggregator",
    "MStarSlideAggregatorOutput",
    "MStarSlideAggregatorPreTrainedModel",
    "MStarNystromAttention",
    "check_patch_features",
    "iterative_pinv",
]
