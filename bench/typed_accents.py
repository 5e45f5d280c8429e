"""Text typed without accents (``casual.reaccent``): the bundled test as edited, as typed casually
(``common.casual``) and both again without written accents or ü (ñ kept: it has a key of its own),
scored against the same references, for each model decoded three ways: without reaccenting, with
the table read from the vocabulary alone (what a checkpoint from before ``Lexicon.accented`` gets)
and with the table the training sources' word counts keep (what a model trained now gets; counted
here on the model's own training data, as training counts it).

    python bench/typed_accents.py CHECKPOINT [CHECKPOINT ...] --json bench/results/typed_accents.json \\
        --doc docs/decoding.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import unicodedata
from pathlib import Path

from sacrebleu.metrics import BLEU

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import casual, cpu_model, evaluation_sets, report

from translate import translator as translator_module
from translate.casual import accented_pieces
from translate.corpus import load_pairs
from translate.encoded import tokenize_corpus
from translate.translator import Translator


def unaccented(line: str) -> str:
    """``line`` without written accents or ü; ñ stays."""
    return "".join(c if c in "ñÑ" else "".join(x for x in unicodedata.normalize("NFD", c)
                                                if not unicodedata.combining(x)) for c in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--json")
    parser.add_argument("--doc")
    args = parser.parse_args()

    sources, references = evaluation_sets()["test"]
    sets = {"edited": sources, "casual": [casual(s) for s in sources],
            "casual, no accents": [unaccented(casual(s)) for s in sources],
            "edited, no accents": [unaccented(s) for s in sources]}
    reaccent = translator_module.reaccent
    results = []
    for checkpoint in args.checkpoints:
        translator = Translator.load(checkpoint)
        config = translator.config
        train = load_pairs(config.data.train, config.data.src_lang, config.data.tgt_lang, "train")
        encoded = tokenize_corpus(train, translator.tokenizer, config.data.src_lang, config.data.tgt_lang,
                                  config.data.num_proc)
        counted = accented_pieces(translator.tokenizer, encoded[0])
        row = {"checkpoint": checkpoint, "accented": len(counted)}
        for way in ("off", "vocabulary", "counted"):
            # off: the restoring step without reaccenting; else the table from the vocabulary alone or counted
            translator_module.reaccent = (lambda text, table: text) if way == "off" else reaccent
            translator.lexicon = dataclasses.replace(translator.lexicon,
                                                     accented=counted if way == "counted" else None)
            for name, lines in sets.items():
                outputs = [n[0].text for n in translator.translate(lines)]
                row[f"{name} {way}"] = BLEU().corpus_score(outputs, [references]).score
        translator_module.reaccent = reaccent
        results.append(row)
        print(row, flush=True)

    table = ["| model | copy | without reaccenting | vocabulary's table | counted table |", "|---|---|---|---|---|"]
    for row in results:
        for name in sets:
            table.append(f"| {Path(row['checkpoint']).name} | {name} | {row[name + ' off']:.2f} | "
                         f"{row[name + ' vocabulary']:.2f} | {row[name + ' counted']:.2f} |")
    text = "\n".join(table) + ("\n\nBundled test, 2,000 lines, BLEU against the same references; default decoding "
                               f"(beam 5, int8, shortlist); {cpu_model()}. Made by `python bench/typed_accents.py`.")
    report(text, {"machine": cpu_model(), "models": results}, args.json, args.doc,
           "<!-- typed-accents-table:begin -->", "<!-- typed-accents-table:end -->")


if __name__ == "__main__":
    main()
