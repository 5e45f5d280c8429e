"""Glossaries: how many glossary terms constrained beam search places, and what it does to BLEU.
The bundled test split decoded with the default options, without and with a glossary of one entry
per sentence drawn from its reference, as Dinu et al. (2019) draw terms: a reference word (lower
case, not its first, not among the ``--common`` most frequent target pieces: a content word)
aligned by the checkpoint's lexicon with a source word (one of the source word's pieces has the
reference word's piece among its ``--top`` likeliest translations), the rarest such word where a
sentence has several. Prints and writes JSON: entries, terms placed (as whole words in the output,
any case), those the translator reported as not placed, the unconstrained output's own rate, BLEU
and chrF of both (on all sentences, and on those whose unconstrained output lacks its term), and
sentences per second; one thread.

    python bench/glossary.py /work/domain/base-s1/best.pt --json bench/results/glossary.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model

from translate.evaluate import score, test_set
from translate.translator import DecodeOptions, Translator

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def draw_terms(translator: Translator, sources: list[str], references: list[str], top: int,
               common: int) -> list[tuple[str, str] | None]:
    """Per sentence, one (source word, reference word) pair aligned by the lexicon, or None."""
    lexicon, tokenizer = translator.lexicon, translator.tokenizer
    rank = {int(piece): r for r, piece in enumerate(lexicon.frequent.tolist())}
    terms = []
    for source, reference in zip(sources, references):
        src_words = list(dict.fromkeys(w for w in WORD.findall(source) if len(w) >= 3))
        translations = {w: {int(t) for piece in tokenizer.encode_src([w])[0]
                            for t in lexicon.translations[piece, :top].tolist() if t >= 0} for w in src_words}
        best = None
        for word in dict.fromkeys(WORD.findall(reference)[1:]):
            if len(word) < 3 or not word.islower():
                continue
            pieces = tokenizer.encode_tgt([word])[0]
            rarity = min(rank.get(p, len(rank)) for p in pieces)
            if rarity < common:
                continue
            for src in src_words:
                if translations[src] & set(pieces) and (best is None or rarity > best[0]):
                    best = (rarity, src, word)
        terms.append(None if best is None else (best[1], best[2]))
    return terms


def placed(text: str, term: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(term)}(?!\w)", text, re.IGNORECASE) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--top", type=int, default=10, help="lexicon translations of a source piece that align")
    parser.add_argument("--common", type=int, default=100, help="target pieces too frequent to be a term")
    parser.add_argument("--limit", type=int, default=0, help="only the first N sentences (0: all)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    options = DecodeOptions(inter_threads=1)
    translator = Translator.load(args.checkpoint, options)
    test = test_set(translator.config)
    sources, references = test.src, test.tgt
    if args.limit:
        sources, references = sources[: args.limit], references[: args.limit]
    terms = draw_terms(translator, sources, references, args.top, args.common)
    entries = [t for t in terms if t is not None]
    rows, texts_of = {}, {}
    for name, glossaries in (("unconstrained", None), ("glossary", [(t,) if t else () for t in terms])):
        start = time.perf_counter()
        out = translator.translate(sources, glossaries=glossaries)
        seconds = time.perf_counter() - start
        texts = texts_of[name] = [nbest[0].text for nbest in out]
        figures = score(texts, references)
        hits = sum(placed(text, t[1]) for text, t in zip(texts, terms) if t is not None)
        rows[name] = {"bleu": figures["bleu"], "chrf": figures["chrf"], "terms_placed": hits,
                      "satisfaction": hits / max(1, len(entries)), "sent_per_s": len(sources) / seconds,
                      "reported_missed": sum(bool(nbest[0].missed) for nbest in out)}
        print(f"{name:<14} BLEU {figures['bleu']:6.2f}  chrF {figures['chrf']:6.2f}  terms placed "
              f"{hits}/{len(entries)} ({100 * hits / max(1, len(entries)):.1f}%)  reported not placed "
              f"{rows[name]['reported_missed']}  {rows[name]['sent_per_s']:.1f} sent/s", flush=True)
    # the harder part: the sentences whose unconstrained output lacks its term
    hard = [i for i, t in enumerate(terms) if t is not None and not placed(texts_of["unconstrained"][i], t[1])]
    for name in rows:
        figures = score([texts_of[name][i] for i in hard], [references[i] for i in hard])
        rows[name]["missing_subset"] = {"bleu": figures["bleu"], "chrf": figures["chrf"]}
        print(f"{name:<14} on the {len(hard)} sentences whose unconstrained output lacks the term: BLEU "
              f"{figures['bleu']:6.2f}  chrF {figures['chrf']:6.2f}")
    result = {"checkpoint": args.checkpoint, "test": test.origin, "sentences": len(sources),
              "entries": len(entries), "missing_subset_sentences": len(hard),
              "top": args.top, "common": args.common, "precision": translator.precision,
              "machine": cpu_model(), "threads": torch.get_num_threads(), "options": "defaults, inter_threads 1",
              "examples": [list(t) for t in entries[:20]], **rows}
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
