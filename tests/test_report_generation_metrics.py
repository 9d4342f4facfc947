"""COCO-style caption metrics: BLEU-1..4 and ROUGE-L equal pycocoevalcap's own scorers (the maintained
COCO caption evaluation; its Bleu and Rouge scorers are pure Python) and hand computations; the METEOR
approximation equals hand computations and is reported as "METEOR-exact+stem"."""

import math

import pytest

from mstar_hf.evaluation.caption_metrics import (
    METEOR_NAME,
    METEOR_PARAMETERS,
    METRIC_NAMES,
    bleu,
    coco_tokenize,
    compute_caption_metrics,
    meteor_exact_stem,
    rouge_l,
)

meteor = meteor_exact_stem

# report-like texts: several sentences, repeated words, shorter and longer hypotheses, several references
PREDICTIONS = [
    "Invasive ductal carcinoma, grade 2. Margins are negative. No lymphovascular invasion is identified.",
    "Lung adenocarcinoma, acinar predominant. Tumor size 2.5 cm; pleura not involved.",
    "Clear cell renal cell carcinoma.",
    "Benign colonic mucosa with no dysplasia, no dysplasia seen.",
]
REFERENCES = [
    ["Invasive ductal carcinoma, Nottingham grade 2. All margins negative. Lymphovascular invasion is not identified.",
     "Ductal carcinoma, invasive, grade 2 of 3; margins negative."],
    ["Adenocarcinoma of the lung, acinar predominant pattern. Tumor size 2.5 cm. The visceral pleura is not involved."],
    ["Renal cell carcinoma, clear cell type, Fuhrman grade 3, confined to the kidney.", "Clear cell carcinoma."],
    ["Colonic mucosa without dysplasia."],
]


def test_bleu_and_rouge_l_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    # pycocoevalcap scores pre-tokenised text (its PTBTokenizer is Java): give it the COCO tokens, joined
    res = {i: [" ".join(coco_tokenize(p))] for i, p in enumerate(PREDICTIONS)}
    gts = {i: [" ".join(coco_tokenize(r)) for r in refs] for i, refs in enumerate(REFERENCES)}
    coco_bleu, coco_bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    coco_rouge, coco_rouge_per = Rouge().compute_score(gts, res)
    ours = compute_caption_metrics(PREDICTIONS, REFERENCES, return_per_sample=True)
    for n in range(4):
        assert ours[f"BLEU-{n + 1}"] == pytest.approx(coco_bleu[n], rel=1e-9, abs=1e-12)
        # per report: COCO's per-sample BLEU (its "closest" reference length per report)
        assert [s[f"BLEU-{n + 1}"] for s in ours["per_sample"]] == pytest.approx(coco_bleu_per[n], rel=1e-9, abs=1e-12)
    assert ours["ROUGE-L"] == pytest.approx(float(coco_rouge), rel=1e-9)
    assert [s["ROUGE-L"] for s in ours["per_sample"]] == pytest.approx(list(coco_rouge_per), rel=1e-9)
    # not a degenerate example: the four n-gram orders and the reports differ
    assert len({round(ours[f"BLEU-{n}"], 6) for n in range(1, 5)}) == 4 and 0.2 < ours["ROUGE-L"] < 0.9


def test_meteor_approximation_is_named_for_what_it_is():
    assert METEOR_NAME == "METEOR-exact+stem" and "METEOR" not in METRIC_NAMES
    assert METRIC_NAMES == ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR-exact+stem", "ROUGE-L")


def toks(text):
    return coco_tokenize(text)


def test_coco_tokenisation():
    text = ('FINAL DIAGNOSIS:\nLung (left upper lobe), lobectomy; tumor size 2.5 cm. Margins "negative"! '
            "Grade 2/3 -- well-differentiated.")
    assert coco_tokenize(text) == ["final", "diagnosis", "lung", "left", "upper", "lobe", "lobectomy", "tumor", "size",
                                   "2.5", "cm", "margins", "negative", "grade", "2/3", "well-differentiated"]
    assert coco_tokenize("") == [] and coco_tokenize(" . , ") == []


def test_bleu_matches_hand_computation():
    # p1 = 5/6 (the cat sat on mat), p2 = 3/5, p3 = 2/4, p4 = 1/3; equal lengths: no brevity penalty
    scores = compute_caption_metrics(["The cat sat on a mat."], ["the cat sat on the mat"])
    precisions = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    for n in range(4):
        assert scores[f"BLEU-{n + 1}"] == pytest.approx(math.prod(precisions[: n + 1]) ** (1 / (n + 1)), rel=1e-6)


def test_bleu_corpus_pooling_closest_reference_and_coco_guards():
    # sample 1: 3 words, references of 5 and 4 words -> closest length 4; sample 2: exact, 2 words.
    # pooled: p1 = p2 = p3 = 1, no 4-gram at all (0 correct / 0 guesses -> COCO's 1e-15 / 1e-9 = 1e-6),
    # brevity penalty exp(1 - 6/5).
    corpus, per_sample = bleu([toks("a b c"), toks("x y")], [[toks("a b c d e"), toks("a b c d")], [toks("x y")]])
    bp = math.exp(1 - 6 / 5)
    assert corpus[:3] == pytest.approx([bp, bp, bp], rel=1e-6)
    assert corpus[3] == pytest.approx((1e-15 / 1e-9) ** 0.25 * bp, rel=1e-6)
    assert per_sample[0][0] == pytest.approx(math.exp(1 - 4 / 3), rel=1e-6)  # 3 words vs the closest 4


def test_rouge_l_matches_hand_computation():
    # LCS 3: precision 1, recall 0.5, F with beta 1.2
    score, _ = rouge_l([toks("the cat sat")], [[toks("the cat sat on the mat")]])
    assert score == pytest.approx((1 + 1.44) * 1 * 0.5 / (0.5 + 1.44 * 1))
    # several references: the best precision and the best recall are taken separately (COCO)
    score, _ = rouge_l([toks("a b c d")], [[toks("a b x x x x x x"), toks("a b c d e f g h i j k l")]])
    p, r = 1.0, 4 / 12
    assert score == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p))
    # the corpus value is the mean over samples
    score, per_sample = rouge_l([toks("a b"), toks("z")], [[toks("a b")], [toks("y")]])
    assert per_sample == [pytest.approx(1.0), 0.0] and score == pytest.approx(0.5)


def test_meteor_matches_hand_computation():
    alpha, beta, gamma, stem = (METEOR_PARAMETERS[k] for k in ("alpha", "beta", "gamma", "stem_weight"))
    # 4 exact matches + "jumped"~"jumps" by Porter stem, one chunk; 5 hypothesis and 6 reference words
    score, _ = meteor([toks("the quick brown fox jumped")], [[toks("the quick brown fox jumps over")]])
    weighted = 4 + stem * 1
    p, r = weighted / 5, weighted / 6
    fmean = p * r / (alpha * p + (1 - alpha) * r)
    assert score == pytest.approx(fmean * (1 - gamma * (1 / 5) ** beta))
    # swapped words: 2 matches in 2 chunks -> fragmentation 1
    score, _ = meteor([toks("fox brown")], [[toks("brown fox")]])
    assert score == pytest.approx(1 - gamma)
    # an identical segment has no fragmentation penalty (Meteor's rule)
    assert meteor([toks("a b c")], [[toks("a b c")]])[0] == pytest.approx(1.0)
    # the best of several references counts; no match -> 0
    assert meteor([toks("a b c")], [[toks("x y")]])[0] == 0.0
    score, per_sample = meteor([toks("a b c")], [[toks("x y"), toks("a b c")]])
    assert per_sample == [pytest.approx(1.0)]


def test_compute_caption_metrics_output_and_bad_input():
    result = compute_caption_metrics(["the tumor is present", ""], [["the tumor is present"], "no tumor"],
                                     return_per_sample=True)
    assert set(result) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR-exact+stem", "ROUGE-L", "per_sample"}
    assert all(0.0 <= result[k] <= 1.0 for k in result if k != "per_sample")
    assert result["per_sample"][0]["ROUGE-L"] == pytest.approx(1.0) and result["per_sample"][1]["ROUGE-L"] == 0.0
    with pytest.raises(ValueError, match="empty prediction list"):
        compute_caption_metrics([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_caption_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="sample 0 has an empty reference list"):
        compute_caption_metrics(["a"], [[]])
    with pytest.raises(TypeError, match="prediction 0"):
        compute_caption_metrics([None], ["a"])
    with pytest.raises(TypeError, match="not a single string"):
        compute_caption_metrics("abc", "abc")


def test_diagnosis_accuracy_counts_reports_that_name_only_the_right_type():
    from mstar_hf.evaluation.caption_metrics import diagnosis_accuracy, named_diagnosis

    labels = {"adenocarcinoma": ["lung adenocarcinoma", "glandular carcinoma"],
              "squamous_cell_carcinoma": ["squamous cell carcinoma", "epidermoid carcinoma"]}
    assert named_diagnosis("DIAGNOSIS: Lung - GLANDULAR CARCINOMA, grade 2.", labels) == "adenocarcinoma"
    assert named_diagnosis("Keratinizing squamous cell carcinoma.", labels) == "squamous_cell_carcinoma"
    assert named_diagnosis("Adenocarcinoma with a squamous cell carcinoma component.", labels) is None  # both
    assert named_diagnosis("Benign lung parenchyma.", labels) is None
    assert named_diagnosis("Adenocarcinomatous change.", labels) is None  # whole words only
    reports = ["Invasive adenocarcinoma.", "Squamous cell carcinoma.", "No tumour seen.", "Adenocarcinoma."]
    truths = ["adenocarcinoma", "squamous_cell_carcinoma", "adenocarcinoma", "squamous_cell_carcinoma"]
    assert diagnosis_accuracy(reports, truths, labels) == 0.5
    with pytest.raises(ValueError, match="3 reports for 4 truths"):
        diagnosis_accuracy(reports[:3], truths, labels)
