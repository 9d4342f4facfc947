"""The synthetic cohort needs learning (issue #14): stain is a per-slide nuisance shared by every type,
the type lives in the mix of shared tissue patterns; and the probes that measure it are right."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from mstar_hf.data.synthetic_tissue import PATTERNS, draw_stain, paint_tissue, type_morphology
from mstar_hf.evaluation import encoder_probes as ep

TYPES, SLIDES, SIZE = 3, 10, 1024


@pytest.fixture(scope="module")
def painted():
    """3 types x 10 small slides: tissue mean RGB, the painter's record, the type."""
    rgb, shares, types = [], [], []
    for k in range(TYPES):
        for s in range(SLIDES):
            image, record = paint_tissue(SIZE, SIZE, k, np.random.default_rng([k, s]))
            tissue = np.abs(image.astype(int) - np.asarray([242, 241, 239])).sum(-1) > 40
            rgb.append(image[tissue].mean(axis=0))
            shares.append([record["pattern_share"][p] for p in PATTERNS])
            types.append(k)
    return np.asarray(rgb), np.asarray(shares), np.asarray(types)


def _leave_one_out_centroid(x, y):
    correct = [ep.nearest_centroid(np.delete(x, i, 0), np.delete(y, i), x[i:i + 1], y[i:i + 1])[0] for i in range(len(y))]
    return ep.balanced_accuracy_of(y, correct)


def test_stain_comes_from_one_pool_whatever_the_type():
    # the same random stream gives the same stain to every type: the stain carries no type
    records = [paint_tissue(256, 256, k, np.random.default_rng(5))[1]["stain"] for k in range(TYPES)]
    assert records[0] == records[1] == records[2]
    scales = np.asarray([draw_stain(np.random.default_rng(i))["scale_h"] for i in range(200)])
    assert scales.max() / scales.min() > 2  # strong stain variation: the nuisance real cohorts have


def test_colour_does_not_give_the_type_away_but_the_pattern_mix_does(painted):
    rgb, shares, types = painted
    colour = _leave_one_out_centroid(rgb, types)
    patterns = _leave_one_out_centroid(shares, types)
    print(f"\nleave-one-out nearest centroid: mean RGB {colour:.2f}, pattern shares {patterns:.2f} (chance 0.33)")
    assert colour <= 0.5
    assert patterns >= 0.8
    # every type shows every pattern: a patch of any pattern is weak evidence
    for k in range(TYPES):
        assert (type_morphology(k)["mix"] >= 0.08).all()


def test_same_stain_gives_every_type_the_same_mean_colour():
    # Beer-Lambert makes dense patterns (solid sheets) darker than sparse ones at equal uptake; the painter's
    # per-slide white balance takes that out. Averaged over slides under one stain, the types' mean tissue
    # colours agree within a few grey levels (without the white balance: 9 on average, up to 17)
    spreads = []
    for seed in range(3):
        stain = draw_stain(np.random.default_rng([99, seed]))
        means = []
        for k in range(TYPES):
            slides = [paint_tissue(512, 512, k, np.random.default_rng([k, s, seed]), stain=stain, return_patterns=True)
                      for s in range(4)]
            means.append(np.mean([image[pattern >= 0].mean(axis=0) for image, _, pattern in slides], axis=0))
        spreads.append(np.ptp(np.asarray(means), axis=0))
    spreads = np.asarray(spreads)
    print(f"\nper-type mean colour spread under one stain (grey levels, per stain x RGB):\n{spreads.round(1)}")
    assert spreads.mean() <= 5.0


def test_probes_match_hand_computed_values():
    train_x = np.array([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0]])
    train_y = np.array(["a", "a", "b", "b"])
    test_x = np.array([[1.0, 1.0], [6.0, 1.0], [4.0, 1.0]])
    test_y = np.array(["a", "a", "b"])
    # centroids (0, 1) and (10, 1): 1 -> a (right), 6 -> b (wrong), 4 -> a (wrong)
    assert ep.nearest_centroid(train_x, train_y, test_x, test_y).tolist() == [1.0, 0.0, 0.0]
    correct = np.array([1.0, 0.0, 0.0])
    assert ep.balanced_accuracy_of(test_y, correct) == pytest.approx((0.5 + 0.0) / 2)
    assert ep.balanced_accuracy_of(test_y, correct) == pytest.approx(
        balanced_accuracy_score(test_y, np.where(correct == 1, test_y, np.where(test_y == "a", "b", "a"))))
    # 1-shot prototypes by cosine: a test point on the first axis matches b's support (10, *) in every draw
    shares = ep.few_shot_prototypes(train_x, train_y, np.array([[5.0, 0.01]]), np.array(["b"]), shots=1, draws=20)
    assert shares.tolist() == [1.0]
    with pytest.raises(ValueError, match="3-shot: too few"):
        ep.few_shot_prototypes(train_x, train_y, test_x, test_y, shots=3)
    with pytest.raises(ValueError, match="held-out classes without training cases"):
        ep.linear_probe(train_x, train_y, test_x, np.array(["a", "c", "b"]))


def test_linear_probe_and_abmil_learn_a_separable_task():
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b"], 12)
    x = rng.normal(0, 1, (24, 5)) + (y == "b")[:, None] * 3
    assert ep.linear_probe(x[::2], y[::2], x[1::2], y[1::2]).mean() == 1.0
    # bags where only one patch in ten says the class: mean pooling dilutes it, attention finds it
    bags = []
    for label in y:
        bag = rng.normal(0, 1, (10, 4))
        bag[rng.integers(10), 0] = 6.0 if label == "b" else -6.0
        bags.append(bag)
    correct = ep.abmil_probe(bags[::2], y[::2], bags[1::2], y[1::2], epochs=30)
    assert correct.mean() >= 0.9


def test_distillation_metrics_cannot_be_met_by_a_bias():
    rng = np.random.default_rng(0)
    direction = rng.normal(0, 1, 16) * 5
    targets = direction + rng.normal(0, 1, (200, 16))  # one dominant direction, as the aggregator's tokens
    mu = ep.unit_mean(targets[:100])
    held_out = targets[100:]
    mean = ep.distillation_metrics(np.tile(mu, (100, 1)), held_out, mu)
    assert mean["cosine"] > 0.9  # the plain cosine is fooled by the shared direction ...
    assert abs(mean["centred_cosine"]) < 0.1 and mean["retrieval@1"] <= 0.02  # ... these are not
    assert mean["r2"] < 0.1
    # hand-computed: two targets, prediction = own target up to scale -> cosine 1, retrieval 1
    two = np.array([[1.0, 0.0], [0.0, 1.0]])
    m = ep.distillation_metrics(two * 2, two, np.array([0.5, 0.5]))
    assert m["cosine"] == pytest.approx(1.0) and m["retrieval@1"] == 1.0 and m["r2"] == pytest.approx(1.0)
    assert m["mean_target_cosine"] == pytest.approx(np.sqrt(0.5))
    # any scale: the cosine loss leaves it free
    perfect = ep.distillation_metrics(held_out * 3.0, held_out, mu)
    assert perfect["retrieval@1"] == 1.0 and perfect["r2"] == pytest.approx(1.0)
    assert perfect["centred_cosine"] == pytest.approx(1.0)
    noisy = ep.distillation_metrics(held_out + rng.normal(0, 1, held_out.shape), held_out, mu)
    assert 0.3 < noisy["centred_cosine"] < 0.9 and noisy["retrieval@1"] > 5 * mean["retrieval@1"]
    with pytest.raises(ValueError, match=r"\[n, H\]"):
        ep.distillation_metrics(held_out[:, :3], held_out, mu)


def test_paired_comparison_over_cases():
    y = np.repeat(["a", "b", "c"], 10)
    worse = np.zeros(30)
    better = np.ones(30)
    d = ep.compare_encoders(y, worse, better, num_samples=200)
    assert d["delta"] == 1.0 and d["ci_low"] == 1.0
    same = ep.compare_encoders(y, better, better, num_samples=200)
    assert same["delta"] == 0.0 and same["ci_low"] == 0.0 == same["ci_high"]
    s = ep.summarise(y, np.r_[np.ones(15), np.zeros(15)], num_samples=200)
    assert s["balanced_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3) and s["ci_low"] < s["balanced_accuracy"] < s["ci_high"]


def test_mean_pairwise_cosine_tells_a_collapsed_space():
    rng = np.random.default_rng(0)
    spread = rng.standard_normal((300, 16))
    collapsed = np.ones(16) * 5 + 0.1 * spread  # one shared direction plus a little
    assert abs(ep.mean_pairwise_cosine(spread)) < 0.05
    assert ep.mean_pairwise_cosine(collapsed) > 0.99
    # a sample is used above max_rows: about the same figure
    assert abs(ep.mean_pairwise_cosine(collapsed, max_rows=50) - ep.mean_pairwise_cosine(collapsed)) < 1e-3
    with pytest.raises(ValueError, match="n >= 2"):
        ep.mean_pairwise_cosine(spread[:1])
