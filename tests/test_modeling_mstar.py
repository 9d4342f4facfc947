import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

from mstar_hf import MStarConfig, MStarGeneEncoder, MStarModel, MStarPatchModel, MStarSlideAggregator
from mstar_hf.modeling.modeling_mstar import batch_hard_triplet_loss
from mstar_hf.presets import aggregator_config, gene_config, mstar_config, patch_config


def _batch(B=6, N=12, G=40, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        patch_features=torch.randn(B, N, 64, generator=g),
        input_ids=torch.randint(1, 100, (B, T), generator=g),
        attention_mask=torch.ones(B, T, dtype=torch.long),
        rna_bins=torch.randint(0, 8, (B, G), generator=g),
        rna_mask=torch.ones(B, G, dtype=torch.bool),
    )


def _eval_model(config, seed=0):
    torch.manual_seed(seed)
    model = MStarModel(config).eval()
    return model


def test_loss_terms_and_masked_pairs(tiny_config):
    model = _eval_model(tiny_config)
    batch = _batch()
    report_present = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    rna_present = torch.tensor([1, 0, 0, 1, 1, 1], dtype=torch.bool)
    cancer = torch.tensor([0, 0, 1, 1, 2, 2])
    batch["patch_features"].requires_grad_(True)
    out = model(**batch, report_present=report_present, rna_present=rna_present, cancer_type=cancer, return_loss=True)
    assert set(out.pair_losses) == {"slide_report", "slide_rna", "report_rna"}
    assert out.logits_slide_report.shape == (6, 6)
    assert torch.allclose(out.contrastive_loss, torch.stack(list(out.pair_losses.values())).mean())
    assert torch.allclose(out.loss, out.contrastive_loss + out.triplet_loss)
    # absent rows are zero embeddings
    assert torch.all(out.text_embeds[2] == 0) and torch.all(out.rna_embeds[1] == 0)
    # the slide-report InfoNCE equals a hand computation over the cases that have both
    rows = report_present.nonzero().flatten()
    scale = model.logit_scale.exp()
    logits = scale * out.slide_embeds[rows] @ out.text_embeds[rows].T
    target = torch.arange(len(rows))
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.allclose(out.pair_losses["slide_report"], expected, atol=1e-6)
    # an absent report's tokens change nothing
    changed = dict(batch)
    changed["input_ids"] = batch["input_ids"].clone()
    changed["input_ids"][2] = 5
    out2 = model(**changed, report_present=report_present, rna_present=rna_present, cancer_type=cancer, return_loss=True)
    assert torch.allclose(out.loss, out2.loss)


def test_masked_pairs_get_no_gradient(tiny_config):
    model = _eval_model(tiny_config)
    batch = _batch()
    batch["patch_features"].requires_grad_(True)
    # case 2 has only its slide: with no pair and no triplet term, its slide gets no gradient
    report_present = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    rna_present = torch.tensor([1, 0, 0, 1, 1, 1], dtype=torch.bool)
    out = model(**batch, report_present=report_present, rna_present=rna_present, return_loss=True)
    out.loss.backward()
    grad = batch["patch_features"].grad
    assert torch.all(grad[2] == 0)
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0
    assert torch.isfinite(grad).all()


def test_batch_of_one_and_single_modality(tiny_config):
    model = _eval_model(tiny_config)
    batch = _batch(B=1)
    out = model(**batch, cancer_type=torch.tensor([0]), return_loss=True)
    assert out.loss.item() == 0.0 and out.pair_losses == {}
    out.loss.backward()  # a zero loss that is still part of the graph
    out = model(patch_features=_batch()["patch_features"], return_loss=True)
    assert out.text_embeds.abs().sum() == 0
    with pytest.raises(ValueError, match="disagree on the batch size"):
        model(patch_features=torch.randn(2, 5, 64), input_ids=torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="report_present marks cases as present but no report input"):
        model(patch_features=torch.randn(2, 5, 64), report_present=torch.ones(2, dtype=torch.bool))


def test_triplet_loss_picks_the_hardest_pairs():
    # 1-d embeddings of one modality: type 0 at 0.0, 0.1, 1.0 ; type 1 at 0.5, 3.0
    e = torch.tensor([[0.0], [0.1], [1.0], [0.5], [3.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    present = torch.ones(5, dtype=torch.bool)
    loss, chosen = batch_hard_triplet_loss({"slide": e}, {"slide": present}, labels, margin=0.3)
    assert chosen["anchors"].tolist() == [0, 1, 2, 3, 4]
    # farthest positive / nearest negative, by hand
    assert chosen["positives"].tolist() == [2, 2, 0, 4, 3]
    assert chosen["negatives"].tolist() == [3, 3, 3, 1, 2]
    d = lambda a, b: abs(e[a, 0].item() - e[b, 0].item())
    expected = sum(max(d(a, p) - d(a, n) + 0.3, 0.0) for a, p, n in zip(range(5), [2, 2, 0, 4, 3], [3, 3, 3, 1, 2])) / 5
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    # a type seen once has no positive: that anchor is skipped, unknown labels (-1) are ignored
    loss, chosen = batch_hard_triplet_loss({"slide": e}, {"slide": present}, torch.tensor([0, 0, 1, 2, -1]), 0.3)
    assert chosen["anchors"].tolist() == [0, 1]
    # with missing modalities, distances use the shared ones, rescaled
    e2 = {"slide": torch.tensor([[0.0], [1.0], [5.0]]), "rna": torch.tensor([[0.0], [9.0], [2.0]])}
    pres = {"slide": torch.tensor([True, True, True]), "rna": torch.tensor([True, False, True])}
    loss, chosen = batch_hard_triplet_loss(e2, pres, torch.tensor([0, 0, 1]), margin=5.0)
    d01 = math.sqrt(1.0 * 2 / 1)  # only the slide is shared: 1^2, rescaled by 2 modalities / 1 shared
    d02 = math.sqrt(25 + 4)  # both shared
    d12 = math.sqrt(16.0 * 2 / 1)
    assert chosen["anchors"].tolist() == [0, 1]  # case 2 is the only one of its type
    assert chosen["positives"].tolist() == [1, 0] and chosen["negatives"].tolist() == [2, 2]
    assert math.isclose(loss.item(), ((d01 - d02 + 5.0) + (d01 - d12 + 5.0)) / 2, rel_tol=1e-5)


def test_from_submodels_and_parts_round_trip(tmp_path):
    patch = MStarPatchModel(patch_config("tiny"))
    aggregator = MStarSlideAggregator(aggregator_config("tiny"))
    text = BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    rna = MStarGeneEncoder(gene_config("tiny", num_genes=25))
    for name, part in (("patch", patch), ("aggregator", aggregator), ("text", text), ("rna", rna)):
        part.save_pretrained(tmp_path / name)
    model = MStarModel.from_submodels(
        patch=str(tmp_path / "patch"), aggregator=aggregator, text=str(tmp_path / "text"), rna=rna, projection_dim=24
    )
    assert model.config.projection_dim == 24 and model.config.text_config.vocab_size == 60
    for ours, theirs in ((model.patch_model, patch), (model.aggregator, aggregator), (model.rna_model, rna)):
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
    assert torch.equal(model.text_model.embeddings.word_embeddings.weight, text.embeddings.word_embeddings.weight)
    # the whole model and each sub-model save and load on their own
    model.eval().save_pretrained(tmp_path / "mstar")
    loaded = AutoModel.from_pretrained(tmp_path / "mstar").eval()
    assert isinstance(loaded, MStarModel) and isinstance(AutoConfig.from_pretrained(tmp_path / "mstar"), MStarConfig)
    model.aggregator.save_pretrained(tmp_path / "agg_only")
    assert isinstance(AutoModel.from_pretrained(tmp_path / "agg_only"), MStarSlideAggregator)
    batch = dict(patch_features=torch.randn(3, 10, 64), input_ids=torch.randint(0, 60, (3, 6)),
                 rna_bins=torch.randint(0, 8, (3, 25)))
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    for field in ("slide_embeds", "text_embeds", "rna_embeds", "logits_slide_report"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_gradient_checkpointing_same_gradients(tiny_config):
    torch.manual_seed(0)
    model = MStarModel(tiny_config)
    model.train()
    for module in model.modules():  # dropout off so both runs are the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = _batch()
    cancer = torch.tensor([0, 0, 1, 1, 2, 2])
    model(**batch, cancer_type=cancer, return_loss=True).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.text_model.encoder.layer[0].gradient_checkpointing
    assert model.aggregator.layers[0].gradient_checkpointing and model.patch_model.gradient_checkpointing
    model(**batch, cancer_type=cancer, return_loss=True).loss.backward()
    for name, grad in plain.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-5), name


def test_patch_features_spaces(tiny_config):
    model = _eval_model(tiny_config)
    feats = torch.randn(5, 64)
    assert model.get_patch_features(patch_features=feats, space="encoder").pooler_output.shape == (5, 64)
    assert model.get_patch_features(patch_features=feats, space="aggregator").pooler_output.shape == (5, 32)
    shared = model.get_patch_features(patch_features=feats, normalize=True)  # the earlier call form: a tensor
    assert shared.shape == (5, 32) and torch.allclose(shared.norm(dim=-1), torch.ones(5))
    pixels = torch.randn(2, 3, 224, 224)
    assert model.get_patch_features(pixel_values=pixels).pooler_output.shape == (2, 32)
    with pytest.raises(ValueError, match="wrong feature width: expected 64, got 1024"):
        model.get_patch_features(patch_features=torch.randn(2, 1024))


def test_other_cancer_negatives_mask_same_type_pairs(tiny_config):
    """`contrastive_negatives="other_cancer"`: a same-type case is never a negative (as two slides of one
    case); the InfoNCE equals a hand computation with those logits masked, and differs from "all"."""
    batch = _batch()
    cancer = torch.tensor([0, 0, 1, 1, 2, -1])  # the last type is unknown: it stays a negative of everyone
    out_all = _eval_model(tiny_config)(**batch, cancer_type=cancer, return_loss=True)
    config = MStarConfig.from_dict({**tiny_config.to_dict(), "contrastive_negatives": "other_cancer"})
    model = _eval_model(config)
    out = model(**batch, cancer_type=cancer, return_loss=True)
    logits = model.logit_scale.exp() * out.slide_embeds @ out.text_embeds.T
    same = (cancer[:, None] == cancer[None, :]) & (cancer[:, None] >= 0) & ~torch.eye(6, dtype=torch.bool)
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(6)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.allclose(out.pair_losses["slide_report"], expected, atol=1e-6)
    assert not torch.allclose(out.pair_losses["slide_report"], out_all.pair_losses["slide_report"])
    with pytest.raises(ValueError, match="contrastive_negatives"):
        MStarConfig.from_dict({**tiny_config.to_dict(), "contrastive_negatives": "same_cancer"})


def test_patch_alignment_term_is_the_mean_patch_score_infonce(tiny_config):
    """`patch_alignment_loss_weight`: an InfoNCE between each slide's mean normalised projected patch token
    and its report, whose logits are the zero-shot patch route's mean patch cosines (MI-Zero with top-k = N)."""
    batch = _batch()
    mask = torch.ones(6, 12, dtype=torch.bool)
    mask[1, 8:] = False  # a shorter slide: padded rows take no part
    report_present = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)
    paper = _eval_model(tiny_config)(**batch, patch_attention_mask=mask, report_present=report_present,
                                     return_loss=True)
    assert paper.patch_alignment_loss is None  # weight 0 (default): the paper's losses only
    config = MStarConfig.from_dict({**tiny_config.to_dict(), "patch_alignment_loss_weight": 0.5})
    model = _eval_model(config)
    out = model(**batch, patch_attention_mask=mask, report_present=report_present, return_loss=True)
    torch.testing.assert_close(out.loss, paper.loss + 0.5 * out.patch_alignment_loss)

    # by hand: the mean cosine of each slide's real projected patch tokens with each report
    with torch.no_grad():
        agg = model.aggregator(batch["patch_features"], mask)
        tokens = F.normalize(model.slide_projection(agg.patch_embeds), dim=-1)
        rows = report_present.nonzero().flatten()
        scores = torch.stack([torch.stack([(tokens[i][mask[i]] @ out.text_embeds[j]).mean() for j in rows])
                              for i in rows])
        logits = model.logit_scale.exp() * scores
        target = torch.arange(len(rows))
        expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(out.patch_alignment_loss, expected, atol=1e-5, rtol=1e-5)
    # it trains the patch tokens' path: the aggregator gets gradient from the term alone
    out.patch_alignment_loss.backward()
    assert float(model.slide_projection.weight.grad.abs().sum()) > 0
    assert all(float(p.grad.abs().sum()) > 0 for p in model.aggregator.input_proj.parameters())
    with pytest.raises(Exception, match="patch_alignment_loss_weight"):  # a typed, validated field
        MStarConfig.from_dict({**tiny_config.to_dict(), "patch_alignment_loss_weight": "much"})
