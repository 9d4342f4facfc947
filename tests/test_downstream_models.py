"""Downstream heads (ABMIL / TransMIL classification, discrete-time survival) and the metric functions."""

import ast
import math

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from mstar_hf import (
    MStarForSlideClassification,
    MStarForSurvivalPrediction,
    MStarModel,
    MStarSlideAggregator,
    MStarSlideClassificationConfig,
    MStarSurvivalConfig,
)
from mstar_hf.evaluation.bootstrap import bootstrap_ci, paired_bootstrap
from mstar_hf.evaluation.classification import (
    classification_metrics,
    classification_metrics_weighted,
    macro_auc,
)
from mstar_hf.evaluation.survival import check_survival_data, concordance_index
from mstar_hf.modeling.modeling_mstar_downstream import compute_time_bins, discretize_times, nll_survival_loss
from mstar_hf.presets import aggregator_config


def abmil_config(**kw):
    return MStarSlideClassificationConfig(head="abmil", input_dim=16, hidden_size=24, attention_dim=8, num_labels=3, **kw)


@pytest.mark.parametrize("gated", [True, False])
def test_abmil_layout_attention_and_padding(gated):
    torch.manual_seed(0)
    model = MStarForSlideClassification(abmil_config(gated_attention=gated)).eval()
    abmil = model.abmil
    # method.md: Linear(D -> hidden), ReLU, Dropout 0.25; attention hidden -> attn_dim -> 1
    assert (abmil.input_proj[0].in_features, abmil.input_proj[0].out_features) == (16, 24)
    assert isinstance(abmil.input_proj[1], torch.nn.ReLU) and abmil.input_proj[2].p == 0.25
    assert (abmil.attention_a[0].in_features, abmil.attention_a[0].out_features) == (24, 8)
    assert (abmil.attention_c.in_features, abmil.attention_c.out_features) == (8, 1)
    assert hasattr(abmil, "attention_b") == gated
    a, b = torch.randn(1, 7, 16), torch.randn(1, 4, 16)
    padded = torch.zeros(2, 7, 16)
    padded[0], padded[1, :4] = a[0], b[0]
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    with torch.no_grad():
        out = model(padded, mask, labels=torch.tensor([0, 2]))
        alone = model(b)
    assert out.logits.shape == (2, 3) and out.attention_scores.shape == (2, 7) and out.slide_embeds.shape == (2, 24)
    assert torch.allclose(out.attention_scores.sum(1), torch.ones(2))
    assert torch.equal(out.attention_scores[1, 4:], torch.zeros(3))
    assert torch.allclose(out.logits[1], alone.logits[0], atol=1e-6)
    assert torch.isclose(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])))
    with pytest.raises(ValueError, match="labels must be in"):
        model(a, labels=torch.tensor([3]))
    with pytest.raises(ValueError, match="wrong feature width"):
        model(torch.randn(1, 5, 8))


def test_transmil_head_and_mstar_plus_initialisation(tmp_path, tiny_config):
    torch.manual_seed(0)
    aggregator = MStarSlideAggregator(aggregator_config("tiny", input_dim=16)).eval()
    head = MStarForSlideClassification.from_aggregator(aggregator, num_labels=2).eval()
    # the pretrained weights are copied exactly before any training
    for name, value in aggregator.state_dict().items():
        assert torch.equal(head.aggregator.state_dict()[name], value), name
    assert head.config.head == "transmil" and head.config.hidden_size == 32
    x = torch.randn(1, 11, 16)
    with torch.no_grad():
        out = head(x)
        slide = aggregator(x).slide_embeds
    assert torch.allclose(out.slide_embeds, slide, atol=1e-6)
    assert torch.allclose(out.logits, head.classifier(slide), atol=1e-6)
    assert out.attention_scores.shape == (1, 11) and torch.isclose(out.attention_scores.sum(), torch.tensor(1.0))

    # from saved folders: an aggregator checkpoint and a full mSTAR model (its .aggregator)
    aggregator.save_pretrained(tmp_path / "agg")
    from_path = MStarForSurvivalPrediction.from_aggregator(tmp_path / "agg", time_bins=[0, 1, 2, 3, 4])
    assert torch.equal(from_path.aggregator.cls_token, aggregator.cls_token)
    mstar = MStarModel(tiny_config)
    mstar.save_pretrained(tmp_path / "mstar")
    from_mstar = MStarForSlideClassification.from_aggregator(str(tmp_path / "mstar"), num_labels=4)
    for name, value in mstar.aggregator.state_dict().items():
        assert torch.equal(from_mstar.aggregator.state_dict()[name], value), name
    with pytest.raises(ValueError, match="head must be 'transmil'"):
        MStarForSlideClassification.from_aggregator(aggregator, head="abmil", num_labels=2)
    with pytest.raises(ValueError, match="input_dim=8"):
        MStarSlideClassificationConfig(head="transmil", input_dim=8, aggregator_config={"input_dim": 16})


def test_auto_classes_round_trip_and_remote_code_files(tmp_path):
    torch.manual_seed(0)
    model = MStarForSlideClassification(abmil_config(id2label={0: "a", 1: "b", 2: "c"})).eval()
    model.save_pretrained(tmp_path / "cls")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    assert isinstance(loaded, MStarForSlideClassification) and loaded.config.id2label[2] == "c"
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)

    bins = [0.5, 2.0, 4.0, 9.0]
    survival = MStarForSurvivalPrediction(
        MStarSurvivalConfig(head="abmil", input_dim=16, hidden_size=24, attention_dim=8, num_time_bins=3, time_bins=bins)
    ).eval()
    survival.save_pretrained(tmp_path / "surv")
    assert AutoConfig.from_pretrained(tmp_path / "surv").time_bins == bins
    again = AutoModel.from_pretrained(tmp_path / "surv").eval()
    with torch.no_grad():
        assert torch.equal(survival(x).risk, again(x).risk)
    # trust_remote_code: auto_map plus copied code that needs only torch, transformers and its siblings
    config = (tmp_path / "cls" / "config.json").read_text()
    assert "AutoModelForSequenceClassification" in config
    for name in ("modeling_mstar_downstream.py", "configuration_mstar_downstream.py", "modeling_mstar_aggregator.py"):
        tree = ast.parse((tmp_path / "cls" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in ("torch", "transformers", "huggingface_hub", "dataclasses", "math",
                                                     "copy", "__future__"), (name, node.module)
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in ("torch", "math", "copy", "os") for a in node.names), name


def test_survival_bins_loss_and_outputs_by_hand():
    times = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 20.0])
    events = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1, 0])
    edges = compute_time_bins(times, events, num_time_bins=2, eps=0.0)
    uncensored = np.array([1.0, 2, 4, 5, 7, 8])
    assert edges == pytest.approx([1.0, float(np.quantile(uncensored, 0.5)), 20.0])  # outer edge: largest time
    assert discretize_times(times, edges).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert discretize_times(torch.tensor([-5.0, 100.0]), edges).tolist() == [0, 1]  # clipped to the end bins
    with pytest.raises(ValueError, match="fewer than num_time_bins=4"):
        compute_time_bins(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, 0]), num_time_bins=4)

    hazards = torch.tensor([[0.2, 0.5, 0.9], [0.1, 0.3, 0.6]])
    s = torch.cumprod(1 - hazards, 1)
    # case 0: event in bin 1 -> -log S(0) - log h(1); case 1: censored in bin 2 -> -log S(2)
    expected = (-(math.log(0.8) + math.log(0.5)) - math.log(0.9 * 0.7 * 0.4)) / 2
    loss = nll_survival_loss(hazards, torch.tensor([1, 2]), torch.tensor([1, 0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # alpha up-weights only the uncensored term
    expected_alpha = 0.6 * expected + 0.4 * (-(math.log(0.8) + math.log(0.5))) / 2
    assert nll_survival_loss(hazards, torch.tensor([1, 2]), torch.tensor([1, 0]), alpha=0.4).item() == pytest.approx(expected_alpha)
    assert torch.allclose(s[0], torch.tensor([0.8, 0.4, 0.04]))

    model = MStarForSurvivalPrediction(MStarSurvivalConfig(head="abmil", input_dim=16, hidden_size=24, attention_dim=8,
                                                           num_time_bins=2, time_bins=edges)).eval()
    out = model(torch.randn(2, 5, 16), times=torch.tensor([1.5, 10.0]), events=torch.tensor([1, 0]))
    assert torch.allclose(out.hazards, torch.sigmoid(out.logits))
    assert torch.allclose(out.risk, -out.survival.sum(1))
    manual = nll_survival_loss(out.hazards, torch.tensor([0, 1]), torch.tensor([1, 0]))
    assert torch.isclose(out.loss, manual)
    with pytest.raises(ValueError, match="needs `events`"):
        model(torch.randn(1, 5, 16), labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="time_bins needs"):
        MStarSurvivalConfig(num_time_bins=4, time_bins=[0.0, 1.0])


def test_classification_metrics_by_hand():
    from sklearn.metrics import roc_auc_score

    # binary: pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4
    assert macro_auc([0, 0, 1, 1], [[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]]) == pytest.approx(0.75)
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.2, 0.6, 0.2], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]])
    m = classification_metrics(y, p)
    # argmax: [0, 1, 1, 0, 2, 2]: recalls 1/2, 1/2, 1 -> balanced 2/3; accuracy 4/6
    assert m["balanced_accuracy"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(4 / 6)
    # F1: class 0: tp1 fp1 fn1 -> 0.5; class 1 the same; class 2: 1.0; weights 2/6 each
    assert m["weighted_f1"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    # a class absent from the test cases: macro-AUC over the classes present
    present = y != 2
    expected = np.mean([roc_auc_score(y[present] == c, p[present, c]) for c in (0, 1)])
    assert macro_auc(y[present], p[present]) == pytest.approx(expected)
    assert math.isnan(macro_auc([1, 1, 1], p[:3]))
    # the vectorised bootstrap twin equals scikit-learn on resampled data (with ties)
    rng = np.random.default_rng(0)
    yy, pp = rng.integers(0, 3, 30), np.round(rng.dirichlet([1, 1, 1], 30), 1)
    idx = [rng.integers(0, 30, 30) for _ in range(20)]
    fast = classification_metrics_weighted(yy, pp, np.stack([np.bincount(i, minlength=30) for i in idx]))
    for b, i in enumerate(idx):
        for key, value in classification_metrics(yy[i], pp[i]).items():
            assert fast[key][b] == pytest.approx(value, nan_ok=True), key


def test_concordance_and_survival_checks():
    # pairs comparable when the earlier time has an event: (0,1), (0,2), (1,2) [case 2 censored is later]
    times, events = [1.0, 2.0, 3.0], [1, 1, 0]
    assert concordance_index(times, events, [3.0, 2.0, 1.0]) == pytest.approx(1.0)
    assert concordance_index(times, events, [1.0, 2.0, 3.0]) == pytest.approx(0.0)
    assert concordance_index(times, events, [3.0, 1.0, 2.0]) == pytest.approx(2 / 3)
    assert math.isnan(concordance_index(times, [0, 0, 0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"times must be finite and > 0; cases 'b'"):
        check_survival_data([1.0, 0.0], [1, 0], ["a", "b"])
    with pytest.raises(ValueError, match="events must be 0"):
        check_survival_data([1.0, 2.0], [1, 2], ["a", "b"])
    with pytest.raises(ValueError, match="no case has an observed event"):
        check_survival_data([1.0, 2.0], [0, 0], ["a", "b"])


def test_bootstrap_and_paired_test():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    good = np.stack([1 - (y * 0.6 + rng.random(80) * 0.4), y * 0.6 + rng.random(80) * 0.4], 1)
    noise = rng.dirichlet([1, 1], 80)
    ci = bootstrap_ci(classification_metrics, y, good, num_samples=300, batched_fn=classification_metrics_weighted)
    auc = ci["macro_auc"]
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"] and auc["num_valid"] == 300
    assert ci == bootstrap_ci(classification_metrics, y, good, num_samples=300, batched_fn=classification_metrics_weighted)
    same = paired_bootstrap(classification_metrics, (y,), good, good, num_samples=200,
                            batched_fn=classification_metrics_weighted)["macro_auc"]
    assert same["delta"] == 0 and same["p_value"] == 1.0
    worse = paired_bootstrap(classification_metrics, (y,), good, noise, num_samples=300,
                             batched_fn=classification_metrics_weighted)["macro_auc"]
    assert worse["delta"] < -0.3 and worse["p_value"] < 0.01 and worse["ci_high"] < 0
    # the loop and the vectorised path draw the same resamples
    slow = paired_bootstrap(classification_metrics, (y,), good, noise, num_samples=20)["macro_auc"]
    fast = paired_bootstrap(classification_metrics, (y,), good, noise, num_samples=20,
                            batched_fn=classification_metrics_weighted)["macro_auc"]
    assert slow == pytest.approx(fast)
