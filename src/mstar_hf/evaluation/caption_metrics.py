"""Report-generation metrics computed the way the COCO caption evaluation (pycocoevalcap) computes them:
BLEU-1..4 and ROUGE-L, from maintained packages (`nltk`, `rouge-score`), with nothing that downloads data
or runs Java, plus an offline METEOR approximation reported under its own name, "METEOR-exact+stem"
(not METEOR: see below). The tests pin BLEU-1..4 and ROUGE-L to pycocoevalcap's own scorers.

What is reproduced exactly, and what is not:

- Tokenisation. COCO runs Stanford's PTBTokenizer (Java) with lower-casing and then drops the
  punctuation tokens in `COCO_PUNCTUATION`. Here: `nltk`'s Treebank tokenizer (the same Penn Treebank
  rules, parentheses written -LRB-/-RRB-) on each sentence (split after . ! ? followed by space),
  lower-cased, the same punctuation dropped. Stanford's tokenizer keeps known abbreviations such as
  "e.g." whole, where this one splits off their last period; on ordinary report text the two should
  agree (not checked against the Java tokenizer, which cannot run here).
- BLEU: exactly COCO's `BleuScorer(option="closest")`: clipped n-gram counts (nltk's
  `modified_precision`), n-gram guesses max(0, len - n + 1), corpus-level sums, the closest reference
  length (ties: the shorter), BLEU-n = (prod_{k<=n} p_k)^(1/n) x brevity penalty, with COCO's 1e-15 /
  1e-9 guards (so a corpus with no 4-gram match gets a tiny non-zero BLEU-4, as in COCO).
- ROUGE-L: exactly COCO's `Rouge`: per report, LCS precision and recall (`rouge-score`'s LCS on the
  COCO tokens), the maximum of each over the references, F with beta = 1.2, averaged over reports.
- METEOR-exact+stem (not METEOR): COCO runs Meteor 1.5 (Java, `-l en -norm`), whose English synonym
  (WordNet) and paraphrase tables ship inside its jar. WordNet for `nltk` is a separate download, and the
  PyPI packages checked do not ship it either (`wn` 1.1.1 is a 95 kB wheel that downloads its data at run time), so here the
  alignment uses the exact and Porter-stem modules only, through
  `nltk.translate.meteor_score.align_words` with an empty synonym lexicon. Scoring follows Meteor 1.5
  with its English ranking parameters (alpha 0.85, beta 0.20, gamma 0.60, stem matches weighted 0.60),
  per-report scores taking the best reference, and the corpus score computed from the pooled
  statistics (what COCO reports), with Meteor's "identical segment" rule (no fragmentation penalty).
  As in Meteor's system score, the pooled chunk count is the sum over reports, so a corpus of several
  reports generated word for word still scores below 1 (one chunk per report is penalised).
  Differences from Java METEOR: no synonym or paraphrase matches, no function-word weighting (delta;
  every word counts as a content word), and nltk's greedy aligner instead of Meteor's search for the
  alignment with the fewest chunks (repeated words can add chunks). The values are therefore close to,
  but not the same as, published COCO METEOR numbers, hence the name "METEOR-exact+stem" wherever it is
  reported; they are consistent within this project.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

COCO_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# COCO's guards against zero counts in BLEU (pycocoevalcap bleu_scorer: "tiny" and "small").
_BLEU_TINY, _BLEU_SMALL = 1e-15, 1e-9
ROUGE_L_BETA = 1.2
# Meteor 1.5, English, task "rank" (the defaults COCO runs): Denkowski & Lavie 2014.
METEOR_PARAMETERS = {"alpha": 0.85, "beta": 0.20, "gamma": 0.60, "stem_weight": 0.60}
# the METEOR approximation is named for what it is: exact + stem matches, no synonyms or paraphrases
METEOR_NAME = "METEOR-exact+stem"
METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", METEOR_NAME, "ROUGE-L")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class _NoSynonyms:
    """Synonym lexicon for nltk's METEOR aligner with no entries: disables the WordNet stage (which
    would need the WordNet corpus download) and keeps exact and stem matching."""

    def synsets(self, word):
        return []


def coco_tokenize(text: str) -> list[str]:
    """COCO caption-evaluation tokens of `text`: PTB tokenisation, lower case, punctuation removed."""
    from nltk.tokenize import TreebankWordTokenizer

    if not isinstance(text, str):
        raise TypeError(f"coco_tokenize expects a string, got {type(text).__name__}.")
    tokenizer = TreebankWordTokenizer()
    tokens = []
    for sentence in _SENTENCE_END.split(text.strip()):
        if sentence:
            tokens.extend(tokenizer.tokenize(sentence, convert_parentheses=True))
    return [t.lower() for t in tokens if t not in COCO_PUNCTUATION]


def _check(predictions, references) -> tuple[list[str], list[list[str]]]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists of strings, not a single string.")
    predictions, references = list(predictions), list(references)
    if not predictions:
        raise ValueError("caption metrics: empty prediction list (nothing to score).")
    if len(predictions) != len(references):
        raise ValueError(
            f"caption metrics: {len(predictions)} predictions but {len(references)} references; they must pair up."
        )
    refs = []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise TypeError(f"caption metrics: prediction {i} is a {type(pred).__name__}, not a string.")
        ref = [ref] if isinstance(ref, str) else list(ref)
        if not ref:
            raise ValueError(f"caption metrics: sample {i} has an empty reference list.")
        if not all(isinstance(r, str) for r in ref):
            raise TypeError(f"caption metrics: the references of sample {i} must be strings.")
        refs.append(ref)
    return predictions, refs


def bleu(hypotheses: Sequence[list[str]], references: Sequence[Sequence[list[str]]], max_n: int = 4
         ) -> tuple[list[float], list[list[float]]]:
    """COCO BLEU on tokenised text. Returns (corpus BLEU-1..max_n, per-sample BLEU-1..max_n)."""
    from nltk.translate.bleu_score import closest_ref_length, modified_precision

    correct, guess = [0] * max_n, [0] * max_n
    test_len = ref_len = 0
    per_sample = []
    for hyp, refs in zip(hypotheses, references):
        closest = closest_ref_length(refs, len(hyp))
        test_len += len(hyp)
        ref_len += closest
        seg_correct = [modified_precision(refs, hyp, n).numerator for n in range(1, max_n + 1)]
        seg_guess = [max(0, len(hyp) - n + 1) for n in range(1, max_n + 1)]
        for k in range(max_n):
            correct[k] += seg_correct[k]
            guess[k] += seg_guess[k]
        per_sample.append(_combine_bleu(seg_correct, seg_guess, len(hyp), closest))
    return _combine_bleu(correct, guess, test_len, ref_len), per_sample


def _combine_bleu(correct, guess, test_len, ref_len) -> list[float]:
    scores, product = [], 1.0
    for k in range(len(correct)):
        product *= (correct[k] + _BLEU_TINY) / (guess[k] + _BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def rouge_l(hypotheses: Sequence[list[str]], references: Sequence[Sequence[list[str]]], beta: float = ROUGE_L_BETA
            ) -> tuple[float, list[float]]:
    """COCO ROUGE-L on tokenised text. Returns (mean over samples, per-sample scores)."""
    from rouge_score import rouge_scorer, tokenizers

    class _Spaces(tokenizers.Tokenizer):  # the text is already COCO-tokenised: split on spaces only
        def tokenize(self, text):
            return text.split(" ") if text else []

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Spaces())
    per_sample = []
    for hyp, refs in zip(hypotheses, references):
        scores = [scorer.score(" ".join(ref), " ".join(hyp))["rougeL"] for ref in refs]
        precision = max(s.precision for s in scores)
        recall = max(s.recall for s in scores)
        if precision > 0 and recall > 0:
            per_sample.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
        else:
            per_sample.append(0.0)
    return sum(per_sample) / len(per_sample), per_sample


def _meteor_stats(hyp: list[str], ref: list[str], stemmer) -> dict:
    from nltk.translate.meteor_score import align_words

    matches, _, _ = align_words(hyp, ref, stemmer=stemmer, wordnet=_NoSynonyms())
    exact = sum(1 for i, j in matches if hyp[i] == ref[j])
    chunks = 0
    previous = None
    for i, j in sorted(matches):
        if previous is None or i != previous[0] + 1 or j != previous[1] + 1:
            chunks += 1
        previous = (i, j)
    return {"hyp_len": len(hyp), "ref_len": len(ref), "matches": len(matches),
            "weighted": exact + METEOR_PARAMETERS["stem_weight"] * (len(matches) - exact), "chunks": chunks}


def _meteor_score(stats: dict) -> float:
    p = METEOR_PARAMETERS
    if stats["matches"] == 0 or stats["hyp_len"] == 0 or stats["ref_len"] == 0:
        return 0.0
    precision = stats["weighted"] / stats["hyp_len"]
    recall = stats["weighted"] / stats["ref_len"]
    fmean = precision * recall / (p["alpha"] * precision + (1 - p["alpha"]) * recall)
    identical = stats["matches"] == stats["hyp_len"] == stats["ref_len"] and stats["chunks"] == 1
    frag = 0.0 if identical else stats["chunks"] / stats["matches"]
    return fmean * (1 - p["gamma"] * frag ** p["beta"])


def meteor_exact_stem(hypotheses: Sequence[list[str]], references: Sequence[Sequence[list[str]]]
                      ) -> tuple[float, list[float]]:
    """METEOR-exact+stem (Meteor 1.5 scoring with exact and stem matches only, see the module docstring)
    on tokenised text. Returns (corpus score from pooled statistics,
    per-sample scores, each against its best reference)."""
    from nltk.stem.porter import PorterStemmer

    stemmer = PorterStemmer()
    totals = Counter()
    per_sample = []
    for hyp, refs in zip(hypotheses, references):
        best = max((_meteor_stats(hyp, ref, stemmer) for ref in refs), key=_meteor_score)
        per_sample.append(_meteor_score(best))
        totals.update(best)
    return _meteor_score(totals), per_sample


def compute_caption_metrics(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    return_per_sample: bool = False,
) -> dict:
    """BLEU-1..4, METEOR-exact+stem and ROUGE-L of generated reports against references, COCO style.

    Args:
        predictions: one generated text per sample.
        references: per sample, a reference text or a list of reference texts.
        return_per_sample: also return `"per_sample"`: a list of {metric: value} per sample.

    Returns:
        `{"BLEU-1": ..., "BLEU-2": ..., "BLEU-3": ..., "BLEU-4": ..., "METEOR-exact+stem": ..., "ROUGE-L": ...}`
        (corpus-level values in [0, 1], as COCO reports them).
    """
    predictions, refs = _check(predictions, references)
    hyp_tokens = [coco_tokenize(p) for p in predictions]
    ref_tokens = [[coco_tokenize(r) for r in rs] for rs in refs]
    bleu_corpus, bleu_samples = bleu(hyp_tokens, ref_tokens)
    meteor_corpus, meteor_samples = meteor_exact_stem(hyp_tokens, ref_tokens)
    rouge_corpus, rouge_samples = rouge_l(hyp_tokens, ref_tokens)
    results = {f"BLEU-{n + 1}": float(bleu_corpus[n]) for n in range(4)}
    results[METEOR_NAME] = float(meteor_corpus)
    results["ROUGE-L"] = float(rouge_corpus)
    if return_per_sample:
        results["per_sample"] = [
            {**{f"BLEU-{n + 1}": float(b[n]) for n in range(4)}, METEOR_NAME: float(m), "ROUGE-L": float(r)}
            for b, m, r in zip(bleu_samples, meteor_samples, rouge_samples)
        ]
    return results


def named_diagnosis(text: str, labels: dict[str, Sequence[str]]) -> str | None:
    """The one label whose name or synonyms (`{label: [synonyms]}`, as the zero-shot pipeline takes them)
    the report names (case-insensitive, whole words); None when it names none or several."""
    named = [label for label, synonyms in labels.items()
             if any(re.search(rf"\b{re.escape(s.lower())}\b", text.lower()) for s in [label.replace("_", " "), *synonyms])]
    return named[0] if len(named) == 1 else None


def diagnosis_accuracy(predictions: Sequence[str], truths: Sequence[str], labels: dict[str, Sequence[str]]) -> float:
    """Share of generated reports that name exactly one diagnosis of `labels`, the case's own (`truths`):
    what BLEU cannot tell, whether a report states the right cancer type."""
    if len(predictions) != len(truths) or not predictions:
        raise ValueError(f"diagnosis_accuracy: {len(predictions)} reports for {len(truths)} truths.")
    return sum(named_diagnosis(p, labels) == t for p, t in zip(predictions, truths)) / len(predictions)


__all__ = ["COCO_PUNCTUATION", "METEOR_NAME", "METEOR_PARAMETERS", "METRIC_NAMES", "ROUGE_L_BETA", "bleu",
           "coco_tokenize", "compute_caption_metrics", "diagnosis_accuracy", "meteor_exact_stem", "named_diagnosis",
           "rouge_l"]
