"""Decodes a file with a `translate` checkpoint the way the peers are measured: batches of 64
sentences taken in length order, model loading left out of the timing.

`translate decode` batches by tokens and has no batch-size option, so run.py calls this instead;
it uses the same library calls as `translate decode` (Translator.load, Translator.translate), with
batches of --batch sentences; like `translate decode`, it decodes several batches at once on CPU
(`translator.decode_workers`).

    python bench/peers/translate_decode.py CHECKPOINT -i SRC -o HYP [--beam 5] [--batch 64]
        [--alpha 1.0] [--max-len-ratio 2.0] [--precision auto] [--inter-threads 0] [--shortlist K]
        [--threads]

Prints one JSON line: {"seconds": decode wall time, "sentences": N, "load_seconds": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, installed or not


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("-i", "--input", required=True)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="sentences a batch")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--max-len-ratio", type=float, default=2.0,
                        help="longest output: ratio x source length + 10 pieces (translate has no fixed "
                             "maximum length; 2.0 is `translate decode`'s default)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                        help="a bf16 or int8 copy on CPU, as `translate decode --bf16 / --int8`")
    parser.add_argument("--shortlist", type=int, default=None,
                        help="`translate decode --shortlist K` (default: its default; 0: the whole vocabulary)")
    parser.add_argument("--inter-threads", type=int, default=0,
                        help="batches decoded at once (`translate decode --inter-threads`; 0: its default)")
    parser.add_argument("--threads", action="store_true",
                        help="decode the batches in threads, as where processes cannot be forked (translator.can_fork)")
    args = parser.parse_args()

    started = time.perf_counter()
    import torch

    from translate.runtime import configure_process
    from translate.translator import DecodeOptions, Translator, decode_workers

    configure_process()  # as the command line does
    if args.threads:
        import translate.translator as translator_module

        translator_module.can_fork = lambda device: False
    # batches of --batch sentences in length order, as the peers take them
    shortlist = {} if args.shortlist is None else {"shortlist": args.shortlist}
    options = DecodeOptions(beam=args.beam, alpha=args.alpha, max_len_ratio=args.max_len_ratio,
                            batch_sentences=args.batch, inter_threads=args.inter_threads, **shortlist)
    translator = Translator.load(args.checkpoint, options, args.precision)  # as `translate decode` loads
    sources = Path(args.input).read_text(encoding="utf-8").splitlines()
    load_seconds = time.perf_counter() - started

    start = time.perf_counter()
    with torch.inference_mode():
        out = translator.translate(sources)
    hyps = [nbest[0].text if nbest else "" for nbest in out]
    seconds = time.perf_counter() - start
    Path(args.output).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    workers = decode_workers(translator.device, options.inter_threads, len(sources))
    print(json.dumps({"seconds": round(seconds, 3), "sentences": len(sources), "load_seconds": round(load_seconds, 3),
                      "max_len_ratio": args.max_len_ratio, "threads": torch.get_num_threads(),
                      "amp": translator.amp, "precision": translator.precision, "inter_threads": workers.count,
                      "processes": workers.processes,
                      "shortlist": options.shortlist if translator.lexicon is not None else 0}), flush=True)


if __name__ == "__main__":
    main()
