"""mSTAR RNA-Seq encoder: scBERT-style gene tokens encoded by a Performer (FAVOR+ linear attention).

Every gene is a token (gene-identity embedding + binned-expression embedding); attention uses
positive orthogonal random features, so time and memory grow linearly with the number of genes,
and is computed in gene chunks so a batch of full 17,425-gene profiles fits in CPU memory. Only
imports torch, transformers and sibling files (copied next to checkpoints for `trust_remote_code`).
"""

import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_mstar import MStarGeneConfig


def orthogonal_random_features(num_features: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[num_features, dim] Gaussian orthogonal random matrix (Performer, Choromanski et al. 2021)."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append(q.T)
    matrix = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator).norm(dim=1)
    return norms[:, None] * matrix


class MStarPerformerAttention(nn.Module):
    """FAVOR+ self-attention; keys outside `mask` contribute nothing."""

    def __init__(self, config: MStarGeneConfig, layer_idx: int):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.chunk_size = config.chunk_size
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        generator = torch.Generator().manual_seed(config.projection_seed + layer_idx)
        # a fixed draw saved with the weights, so a checkpoint's function is reproducible
        self.register_buffer(
            "projection", orthogonal_random_features(config.num_random_features, self.head_dim, generator)
        )

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w.x, |x|^2/2) for x scaled by d^-1/4."""
        x = x * self.head_dim**-0.25
        return x @ self.projection.T.to(x.dtype), x.pow(2).sum(-1, keepdim=True) / 2

    @staticmethod
    def _features(projected: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        # Positive features of the softmax kernel, exp(w.x - |x|^2/2 - stabiliser). The usual 1/sqrt(r)
        # factor is common to numerator and denominator, so it is folded into the epsilon.
        return torch.exp(projected - offset) + 1e-6

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        # the random-feature kernel (exp of projections, sums over all genes) runs in float32 whatever the
        # model's dtype: in bf16 its normaliser loses the precision the approximation depends on
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2).float()
                   for t in self.qkv(hidden_states).chunk(3, -1))
        key_mask = mask[:, None, :, None].to(q.dtype)
        chunks = range(0, n, self.chunk_size)
        # one max over all real keys per (profile, head): a common factor that cancels in the
        # normalisation; a first pass finds it so the key features are built chunk by chunk
        key_max = torch.stack(
            [
                self._project(k[:, :, s : s + self.chunk_size])[0]
                .amax(dim=-1)
                .masked_fill(~mask[:, None, s : s + self.chunk_size], float("-inf"))
                .amax(dim=-1)
                for s in chunks
            ]
        ).amax(0)[..., None, None].detach()
        context, key_sum = 0, 0
        for s in chunks:
            projected, half_norm = self._project(k[:, :, s : s + self.chunk_size])
            kf = self._features(projected, half_norm + key_max) * key_mask[:, :, s : s + self.chunk_size]
            context = context + kf.transpose(-1, -2) @ v[:, :, s : s + self.chunk_size]
            key_sum = key_sum + kf.sum(dim=2)
        outputs = []
        for s in chunks:
            projected, half_norm = self._project(q[:, :, s : s + self.chunk_size])
            qf = self._features(projected, half_norm + projected.amax(-1, keepdim=True).detach())
            outputs.append((qf @ context) / (qf @ key_sum[..., None]))
        out = torch.cat(outputs, dim=2).transpose(1, 2).flatten(2)
        return self.out(out.to(hidden_states.dtype))


class MStarPerformerLayer(GradientCheckpointingLayer):
    def __init__(self, config: MStarGeneConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = MStarPerformerAttention(config, layer_idx)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Dropout(config.hidden_dropout_prob),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.chunk_size = config.chunk_size

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.dropout(self.attn(self.attn_norm(hidden_states), mask))
        # token-wise feed-forward in chunks: the [N, intermediate] activation never exists whole
        return torch.cat(
            [
                part + self.dropout(self.ffn(self.ffn_norm(part)))
                for part in hidden_states.split(self.chunk_size, dim=1)
            ],
            dim=1,
        )


class MStarGenePreTrainedModel(PreTrainedModel):
    config_class = MStarGeneConfig
    base_model_prefix = "gene_encoder"
    main_input_name = "rna_bins"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MStarPerformerLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MStarPerformerAttention):
            generator = torch.Generator().manual_seed(self.config.projection_seed)
            init.copy_(module.projection, orthogonal_random_features(*module.projection.shape, generator))
        elif isinstance(module, MStarGeneEncoder):
            init.normal_(module.cls_token, mean=0.0, std=std)


class MStarGeneEncoder(MStarGenePreTrainedModel):
    r"""
    scBERT-style RNA-Seq encoder.

    Forward:
        rna_bins (`torch.LongTensor` of shape `[B, G]`): binned log1p expression per gene (0 = not expressed),
            genes in the order of the processor's gene vocabulary.
        rna_mask (`torch.BoolTensor` of shape `[B, G]`, *optional*): False for genes missing from a profile
            (they are not attended to).
        gene_ids (`torch.LongTensor` of shape `[G]` or `[B, G]`, *optional*): vocabulary index of each column;
            defaults to `arange(num_genes)` (then G must equal `num_genes`).

    Returns:
        [`BaseModelOutputWithPooling`]: `pooler_output` `[B, hidden_size]` (the class token) and
        `last_hidden_state` `[B, 1 + G, hidden_size]`.
    """

    def __init__(self, config: MStarGeneConfig):
        super().__init__(config)
        self.gene_embeddings = nn.Embedding(config.num_genes, config.gene_embedding_dim)
        self.gene_projection = (
            nn.Linear(config.gene_embedding_dim, config.hidden_size)
            if config.gene_embedding_dim != config.hidden_size
            else nn.Identity()
        )
        self.bin_embeddings = nn.Embedding(config.num_bins, config.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.layers = nn.ModuleList([MStarPerformerLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.gene_embeddings

    def forward(
        self,
        rna_bins: torch.Tensor,
        rna_mask: torch.Tensor | None = None,
        gene_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        config = self.config
        if rna_bins.ndim != 2:
            raise ValueError(f"MStarGeneEncoder expects rna_bins of shape [B, G], got {tuple(rna_bins.shape)}.")
        batch, genes = rna_bins.shape
        if gene_ids is None:
            if genes != config.num_genes:
                raise ValueError(
                    f"MStarGeneEncoder: expected {config.num_genes} genes (the vocabulary), got {genes}; "
                    "align profiles with the processor or pass gene_ids."
                )
            gene_ids = torch.arange(genes, device=rna_bins.device)
        if int(rna_bins.min()) < 0 or int(rna_bins.max()) >= config.num_bins:
            raise ValueError(f"MStarGeneEncoder: rna_bins must lie in [0, {config.num_bins}), got "
                             f"[{int(rna_bins.min())}, {int(rna_bins.max())}].")
        if rna_mask is None:
            rna_mask = torch.ones_like(rna_bins, dtype=torch.bool)
        elif tuple(rna_mask.shape) != (batch, genes):
            raise ValueError(f"MStarGeneEncoder: rna_mask shape {tuple(rna_mask.shape)} != rna_bins shape {(batch, genes)}.")
        rna_mask = rna_mask.bool()
        empty = (~rna_mask).all(dim=1).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"MStarGeneEncoder: the profiles at batch index {empty} have no measured gene.")
        tokens = self.gene_projection(self.gene_embeddings(gene_ids)) + self.bin_embeddings(rna_bins)
        if tokens.shape[0] != batch:
            tokens = tokens.expand(batch, -1, -1)
        hidden = torch.cat([self.cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens], dim=1)
        mask = torch.cat([rna_mask.new_ones(batch, 1), rna_mask], dim=1)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        hidden = self.final_norm(hidden)
        return_dict = return_dict if return_dict is not None else config.return_dict
        if not return_dict:
            return hidden, hidden[:, 0]
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=hidden[:, 0])


__all__ = ["MStarGeneEncoder", "MStarGenePreTrainedModel", "MStarPerformerAttention", "orthogonal_random_features"]
