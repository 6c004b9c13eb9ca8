"""E2E text metrics: hand-worked cases, and agreement with reference implementations where installed."""

import math

import pytest

from hsplit_sim.textmetrics import (_words, bleu, cider, meteor, nist, rouge_l, score_corpus, tokenize,
                                  unavailable_metrics)

# Small E2E-like corpus with a varying number of references per MR.
HYPS = [
    "The Eagle is a cheap coffee shop near Burger King in the riverside area.",
    "Zizzi is a family-friendly pub with a customer rating of 5 out of 5.",
    "The Phoenix serves French food in the city centre; prices are £20-25.",
    "Aromi is a coffee shop that is not family-friendly.",
]
REFS = [
    ["The Eagle is a cheap coffee shop in the riverside area near Burger King.",
     "Near Burger King by the river there is a low-priced coffee shop called The Eagle.",
     "The Eagle coffee shop, near Burger King at the riverside, is cheap."],
    ["Zizzi is a pub which is family-friendly and rated 5 out of 5 by customers.",
     "With a 5 out of 5 customer rating, Zizzi is a family-friendly pub."],
    ["The Phoenix is a French restaurant in the city centre with prices of £20-25."],
    ["Aromi is a coffee shop which is not family-friendly.",
     "Aromi coffee shop is not child friendly.",
     "Aromi is an adults-only coffee shop.",
     "The coffee shop Aromi is not kid friendly."],
]


def test_tokenize_lowercases_and_splits_punctuation_like_mteval():
    assert tokenize("The Eagle, a pub (cheap) near Café Rouge.") == \
        ["the", "eagle", ",", "a", "pub", "(", "cheap", ")", "near", "café", "rouge", "."]
    assert tokenize("£20-25, 3.5 stars") == ["£20", "-", "25", ",", "3.5", "stars"]


def test_perfect_match_scores_one():
    hyps, refs = HYPS, [[h] for h in HYPS]
    assert bleu(hyps, refs) == pytest.approx(1.0)
    assert rouge_l(hyps, refs) == pytest.approx(1.0)


def test_bleu_by_hand_from_clipped_precisions_and_brevity_penalty():
    hyps = ["the cat sat on the mat", "the the the the"]
    refs = [["the cat sat on the red mat"], ["the cat is here", "the the end"]]
    # Clipped matches / hypothesis n-grams, summed over both segments:
    # 1-grams (6 + 2) / (6 + 4): "the" clipped to 2 in segment 2 (its count in "the the end");
    # 2-grams (4 + 1) / (5 + 3); 3-grams (3 + 0) / (4 + 2); 4-grams (2 + 0) / (3 + 1).
    # Closest reference lengths: 7, and 4 of {4, 3} for the 4-token hypothesis: r = 11, c = 10.
    precisions = [8 / 10, 5 / 8, 3 / 6, 2 / 4]
    expected = math.exp(1 - 11 / 10) * math.prod(precisions) ** 0.25
    assert bleu(hyps, refs) == pytest.approx(expected, abs=1e-12)


def test_nist_by_hand_from_information_weights():
    # Perfect match "a b": info(a) = info(b) = log2(2 words / 1) = 1, info(a b) = log2(1 / 1) = 0.
    assert nist(["a b"], [["a b"]]) == pytest.approx(1.0)
    # Reference "a b c": info(a) = info(b) = log2(3); length ratio 2/3 halves the score.
    assert nist(["a b"], [["a b c"]]) == pytest.approx(0.5 * math.log2(3))


def test_rouge_l_by_hand():
    # LCS("a b c d", "a c d e f") = 3: P = 3/4, R = 3/5, F with beta = 1.2.
    p, r, b2 = 3 / 4, 3 / 5, 1.2 ** 2
    assert rouge_l(["a b c d"], [["a c d e f"]]) == pytest.approx((1 + b2) * p * r / (r + b2 * p))


def test_cider_is_zero_for_one_segment_and_rewards_matches():
    # IDF over a one-segment corpus is log(1) = 0 for every n-gram, as in pycocoevalcap.
    assert cider(["a b c"], [["a b c"]]) == 0.0
    assert cider(HYPS, [[h] for h in HYPS]) > cider(HYPS, REFS) > 0.0


def test_more_references_help():
    bad = [["Nothing in common here at all, really."] for _ in HYPS]
    with_good = [b + r for b, r in zip(bad, REFS)]
    for metric in (bleu, nist, rouge_l, cider):
        assert metric(HYPS, with_good) > metric(HYPS, bad), metric.__name__


def test_empty_hypotheses_score_zero():
    empty = ["" for _ in HYPS]
    for metric in (bleu, nist, rouge_l, cider):
        assert metric(empty, REFS) == 0.0, metric.__name__


def test_rejects_mismatched_corpus():
    with pytest.raises(ValueError):
        bleu(HYPS, REFS[:-1])
    with pytest.raises(ValueError):
        nist(["a"], [[]])


def test_bleu_agrees_with_sacrebleu_own_tokenizer():
    sacrebleu = pytest.importorskip("sacrebleu")
    streams = [[refs[k] if k < len(refs) else None for refs in REFS] for k in range(4)]
    expected = sacrebleu.corpus_bleu(HYPS, streams, smooth_method="none", lowercase=True, tokenize="13a")
    assert bleu(HYPS, REFS) == pytest.approx(expected.score / 100, abs=1e-6)


def test_bleu_agrees_with_nltk():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    expected = bleu_score.corpus_bleu([[tokenize(r) for r in refs] for refs in REFS], [tokenize(h) for h in HYPS])
    assert bleu(HYPS, REFS) == pytest.approx(expected, abs=1e-9)


def test_nist_agrees_with_nltk_on_single_references():
    # nltk scores each segment against its single best reference, mteval against all at once:
    # the two only coincide with one reference per segment.
    nist_score = pytest.importorskip("nltk.translate.nist_score")
    refs = [r[:1] for r in REFS]
    expected = nist_score.corpus_nist([[tokenize(r) for r in rs] for rs in refs], [tokenize(h) for h in HYPS])
    assert nist(HYPS, refs) == pytest.approx(expected, abs=1e-9)
    short = [" ".join(tokenize(h)[:5]) for h in HYPS]  # exercises the brevity penalty
    expected = nist_score.corpus_nist([[tokenize(r) for r in rs] for rs in refs], [tokenize(h) for h in short])
    assert nist(short, refs) == pytest.approx(expected, abs=1e-9)


def _coco(hyps, refs):
    """Inputs for pycocoevalcap scorers: the same punctuation-free words our ROUGE-L and CIDEr score."""
    hyp_words, ref_words = _words(hyps, refs)
    return ({i: [" ".join(r) for r in rs] for i, rs in enumerate(ref_words)},
            {i: [" ".join(h)] for i, h in enumerate(hyp_words)})


def test_rouge_l_and_cider_agree_with_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco(HYPS, REFS)
    assert rouge_l(HYPS, REFS) == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-9)
    assert cider(HYPS, REFS) == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)


@pytest.mark.skipif("meteor" in unavailable_metrics(), reason="METEOR needs java and pycocoevalcap's jar")
def test_score_corpus_runs_real_meteor_with_synonyms():
    # Takes ~7 s: one JVM start that loads METEOR's paraphrase table.
    scores = score_corpus(["The Eagle is a cheap restaurant."], [["The Eagle is an inexpensive restaurant."]])
    assert set(scores) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    # Value printed by `java -jar meteor-1.5.jar hyp ref -l en -norm` for this pair; "cheap" and
    # "inexpensive" only match through WordNet synonyms.
    assert scores["meteor"] == pytest.approx(0.8833333333333333, abs=1e-9)


def test_meteor_reports_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "meteor" in unavailable_metrics()
    assert "meteor" not in score_corpus(["a b"], [["a b"]])
    with pytest.raises(RuntimeError):
        meteor(["a b"], [["a b"]])
