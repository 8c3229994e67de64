"""CIDEr-D as self-critical training's reward: the COCO server's CIDEr-D (pycocoevalcap's formula, checked
against it in tests/test_scst.py) with document frequencies counted once over a fixed corpus, the training
references, instead of over the images being scored.
"""

import math
from collections import Counter

from support.ptb_tokenizer import coco_tokenize


def ngram_counts(tokens: list[str], n: int = 4) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


class CiderD:
    """CIDEr-D whose document frequencies come once from a fixed corpus, the training references (as
    ruotianluo/ImageCaptioning.pytorch's CiderD). pycocoevalcap's Cider counts them over the images it is
    given, which for a batch of 32 images makes every n-gram rare. The formula is pycocoevalcap's: tf-idf
    vectors of 1- to 4-grams with idf log(images) - log(max(1, df)), products clipped as min(hyp, ref) x ref,
    a cosine per n, a Gaussian length penalty (sigma 6), the mean over n, averaged over references, x 10."""

    def __init__(self, references: list[list[str]], sigma: float = 6.0):
        # PTB tokens joined by spaces: a small footprint for COCO's 600k references; n-grams counted on use
        self.references = [[" ".join(coco_tokenize(r)) for r in refs] for refs in references]
        self.df = Counter(g for refs in self.references  # in how many images' references each n-gram occurs
                          for g in set().union(*(ngram_counts(r.split()) for r in refs)))
        self.log_images, self.sigma = math.log(len(references)), sigma

    def _vector(self, counts: Counter):
        """-> tf-idf per n ({n-gram: weight}, n = 1..4), their norms, and the length, which pycocoevalcap
        counts in bigrams (a caption's words less one), as here, to give its figures exactly."""
        vector = [{} for _ in range(4)]
        for gram, tf in counts.items():
            vector[len(gram) - 1][gram] = tf * (self.log_images - math.log(max(1.0, self.df[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vector]
        return vector, norms, sum(counts[gram] for gram in vector[1])

    def scores(self, image: int, hypotheses: list[str]) -> list[float]:
        """CIDEr-D of each hypothesis against the references of image `image`."""
        references = [self._vector(ngram_counts(r.split())) for r in self.references[image]]
        scores = []
        for hypothesis in hypotheses:
            vector, norms, length = self._vector(ngram_counts(coco_tokenize(hypothesis)))
            total = 0.0
            for ref_vector, ref_norms, ref_length in references:
                penalty = math.exp(-(length - ref_length) ** 2 / (2 * self.sigma ** 2))
                for n in range(4):
                    dot = sum(min(w, ref_vector[n].get(g, 0.0)) * ref_vector[n].get(g, 0.0)
                              for g, w in vector[n].items())
                    if norms[n] and ref_norms[n]:
                        total += dot / (norms[n] * ref_norms[n]) * penalty
            scores.append(10.0 * total / (4 * len(references)))
        return scores
