"""Score generated texts against multiple references offline, the way the E2E NLG challenge does.

The E2E scripts lowercase everything and compute BLEU and NIST on mteval-v13a tokens, and METEOR,
ROUGE-L and CIDEr on tokens without punctuation (their MS-COCO tokenizer drops it). We do the same,
with the mteval-v13a tokenizer for all five, so scores are comparable to published E2E numbers
up to tokenizer details (e.g. the Stanford tokenizer also splits "it's" into "it 's").
"""

import importlib.resources
import math
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import sacrebleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from hsplit_sim.results import GENERATION_METRICS

_TOKENIZER_13A = Tokenizer13a()

# Tokens the MS-COCO (PTB) tokenizer removes, as they come out of the mteval-v13a tokenizer.
_PUNCTUATION = {"'", '"', "`", "(", ")", "{", "}", ".", "?", "!", ",", ":", "-", "--", "...", ";"}

# NIST brevity penalty: beta such that a system/reference length ratio of 2/3 costs a factor 0.5.
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def tokenize(text: str) -> list[str]:
    """Lowercase and split on punctuation as mteval-v13a does, so BLEU/NIST match the E2E scripts."""
    return _TOKENIZER_13A(text.lower()).split()


def _tokenized(hypotheses: list[str], references: list[list[str]]) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Tokenize a corpus, rejecting shapes that would make the corpus scores meaningless."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("empty corpus")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    return [tokenize(h) for h in hypotheses], [[tokenize(r) for r in refs] for refs in references]


def _words(hypotheses: list[str], references: list[list[str]]) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Tokens without punctuation, as the E2E scripts feed METEOR, ROUGE-L and CIDEr."""
    hyps, refs = _tokenized(hypotheses, references)

    def strip(tokens):
        return [t for t in tokens if t not in _PUNCTUATION]

    return [strip(h) for h in hyps], [[strip(r) for r in rs] for rs in refs]


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 in 0-1, unsmoothed, closest reference length, as mteval-v13a (via sacrebleu)."""
    hyps, refs = _tokenized(hypotheses, references)
    # sacrebleu takes one stream per reference position; None marks a missing reference.
    n_streams = max(len(rs) for rs in refs)
    streams = [[" ".join(rs[k]) if k < len(rs) else None for rs in refs] for k in range(n_streams)]
    score = sacrebleu.corpus_bleu([" ".join(h) for h in hyps], streams,
                                  smooth_method="none", tokenize="none", force=True)
    return score.score / 100.0


def nist(hypotheses: list[str], references: list[list[str]], max_n: int = 5) -> float:
    """Corpus NIST (Doddington 2002) as mteval-v13a computes it, n-grams up to max_n.

    Information weights come from n-gram counts over all references of the corpus; matches are
    clipped by the highest count in any single reference; the brevity penalty compares the
    hypothesis length with the average reference length of each segment.
    """
    hyps, refs = _tokenized(hypotheses, references)
    ref_counts = Counter()
    ref_words = 0
    for segment in refs:
        for ref in segment:
            ref_words += len(ref)
            for n in range(1, max_n + 1):
                ref_counts.update(_ngrams(ref, n))

    def info(ngram):
        context = ref_counts[ngram[:-1]] if len(ngram) > 1 else ref_words
        return math.log2(context / ref_counts[ngram])

    gained = [0.0] * max_n
    produced = [0] * max_n
    hyp_len, ref_len = 0, 0.0
    for hyp, segment in zip(hyps, refs):
        hyp_len += len(hyp)
        ref_len += sum(len(r) for r in segment) / len(segment)
        for n in range(1, max_n + 1):
            hyp_ngrams = _ngrams(hyp, n)
            max_ref = Counter()
            for ref in segment:
                max_ref |= _ngrams(ref, n)
            produced[n - 1] += sum(hyp_ngrams.values())
            gained[n - 1] += sum(info(g) * c for g, c in (hyp_ngrams & max_ref).items())
    score = sum(g / max(p, 1) for g, p in zip(gained, produced))
    ratio = hyp_len / ref_len if ref_len else 0.0
    if ratio >= 1.0:
        return score
    if ratio <= 0.0:
        return 0.0
    return score * math.exp(-_NIST_BETA * math.log(ratio) ** 2)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hypotheses: list[str], references: list[list[str]], beta: float = 1.2) -> float:
    """Mean over segments of the LCS F-measure with beta=1.2, best precision and recall over references (pycocoevalcap)."""
    hyps, refs = _words(hypotheses, references)
    total = 0.0
    for hyp, segment in zip(hyps, refs):
        if not hyp:
            continue
        lcs = [_lcs_length(hyp, ref) for ref in segment]
        precision = max(lcs) / len(hyp)
        recall = max((c / len(ref) for c, ref in zip(lcs, segment) if ref), default=0.0)
        if precision and recall:
            total += (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)
    return total / len(hyps)


def cider(hypotheses: list[str], references: list[list[str]], max_n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015) as pycocoevalcap's Cider computes it.

    TF-IDF n-gram vectors with document frequencies over the references of this corpus (so a
    one-segment corpus scores 0), hypothesis weights clipped by the reference's, a Gaussian
    length penalty, averaged over n=1..max_n and over references, times 10.
    """
    hyps, refs = _words(hypotheses, references)

    def all_ngrams(tokens):
        counts = Counter()
        for n in range(1, max_n + 1):
            counts.update(_ngrams(tokens, n))
        return counts

    doc_freq = Counter()
    for segment in refs:
        doc_freq.update(set().union(*(all_ngrams(r) for r in segment)))
    log_docs = math.log(len(refs))

    def tfidf(tokens):
        vectors = [{} for _ in range(max_n)]
        for ngram, tf in all_ngrams(tokens).items():
            vectors[len(ngram) - 1][ngram] = tf * (log_docs - math.log(max(1.0, doc_freq[ngram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vectors]
        return vectors, norms

    total = 0.0
    for hyp, segment in zip(hyps, refs):
        hyp_vectors, hyp_norms = tfidf(hyp)
        similarity = 0.0
        for ref in segment:
            ref_vectors, ref_norms = tfidf(ref)
            penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma ** 2))
            for hv, rv, hn, rn in zip(hyp_vectors, ref_vectors, hyp_norms, ref_norms):
                if hn and rn:
                    dot = sum(min(w, rv.get(g, 0.0)) * rv.get(g, 0.0) for g, w in hv.items())
                    similarity += penalty * dot / (hn * rn)
        total += 10.0 * similarity / (max_n * len(segment))
    return total / len(hyps)


def _meteor_jar() -> Path | None:
    """meteor-1.5.jar as shipped by pycocoevalcap, with WordNet synonyms inside and paraphrases beside it."""
    try:
        jar = Path(str(importlib.resources.files("pycocoevalcap.meteor") / "meteor-1.5.jar"))
    except ModuleNotFoundError:
        return None
    return jar if jar.is_file() else None


def unavailable_metrics() -> dict[str, str]:
    """Metrics that cannot run here, with why; the others need nothing beyond Python packages."""
    if _meteor_jar() is None:
        return {"meteor": "pycocoevalcap (which ships meteor-1.5.jar and its paraphrase table) is not installed"}
    if shutil.which("java") is None:
        return {"meteor": "METEOR 1.5 is a Java program and no `java` is on PATH"}
    return {}


def meteor(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus METEOR 1.5 (exact, stem, WordNet synonym and paraphrase matches) from the real jar.

    Talks to the jar over stdin as pycocoevalcap's wrapper does: one SCORE line per segment
    returns its sufficient statistics, one EVAL line aggregates them into the corpus score.
    Starting the JVM and loading the paraphrase table takes several seconds.
    """
    reason = unavailable_metrics().get("meteor")
    if reason:
        raise RuntimeError(reason)
    hyps, refs = _words(hypotheses, references)
    command = ["java", "-Xmx2G", "-jar", str(_meteor_jar()), "-", "-", "-stdio", "-l", "en", "-norm"]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as proc:

        def send(line):
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

        def receive():
            answer = proc.stdout.readline()
            if not answer:
                raise RuntimeError("meteor-1.5.jar exited early")
            return answer.strip()

        # The tokenizer splits "|", so the " ||| " field separator cannot occur inside a text.
        stats = []
        for hyp, segment in zip(hyps, refs):
            send(" ||| ".join(["SCORE", *(" ".join(r) for r in segment), " ".join(hyp)]))
            stats.append(receive())
        send(" ||| ".join(["EVAL", *stats]))
        for _ in stats:
            receive()  # per-segment scores come before the corpus score
        return float(receive())


_METRICS = dict(zip(GENERATION_METRICS, (bleu, nist, meteor, rouge_l, cider)))


def score_corpus(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """All E2E metrics that can run here; see unavailable_metrics() for the ones left out."""
    missing = unavailable_metrics()
    return {name: metric(hypotheses, references) for name, metric in _METRICS.items() if name not in missing}
