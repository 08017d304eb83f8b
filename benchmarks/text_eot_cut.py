"""Text-encoding latency with and without cutting the sequence at the last end-of-text token.

A short query like "a dog on a beach" is 7 tokens of the 77-position context; with a causal mask the
positions after the end-of-text token cannot change the features, so CLIP.encode_text drops them.
This prints the median latency of encode_text for batch 1 and batch 32 both ways, and the speed-up.

    python benchmarks/text_eot_cut.py            # ViT-B-32 text tower, CPU, 11 runs per cell
    python benchmarks/text_eot_cut.py --runs 50 --threads 1
"""

import argparse
import statistics
import time

import torch

from clipsearch.configs import get_config
from clipsearch.model import build_model
from clipsearch.tokenizer import Tokenizer

QUERIES = [
    "a dog on a beach",
    "sunset over the mountains",
    "my cat asleep on the sofa",
    "birthday cake with candles",
    "a red car in the snow",
    "children playing in a park",
    "a plate of pasta",
    "old town street at night",
]


def median_ms(model, tokens: torch.Tensor, runs: int, warmup: int = 3) -> float:
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            start = time.perf_counter()
            model.encode_text(tokens)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="named architecture (random weights: speed only)")
    parser.add_argument("--runs", type=int, default=11, help="timed runs per cell; the median is shown")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model(get_config(args.model)).eval()
    tokenize = Tokenizer(context_length=model.context_length)
    print(
        f"model {args.model} text tower, CPU, {torch.get_num_threads()} threads, median of {args.runs} runs"
    )
    print()
    print("| batch | tokens kept | full 77 (ms) | EOT cut (ms) | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for batch in (1, 32):
        texts = [QUERIES[i % len(QUERIES)] for i in range(batch)]
        tokens = tokenize(texts)  # [batch, 77]
        model._eot_cut = False
        full = median_ms(model, tokens, args.runs)
        with torch.inference_mode():
            full_features = model.encode_text(tokens)
        model._eot_cut = True
        cut = median_ms(model, tokens, args.runs)
        with torch.inference_mode():
            diff = (model.encode_text(tokens) - full_features).abs().max().item()
        if diff > 1e-4 * full_features.abs().max().item():
            raise SystemExit(f"cut and full features differ by {diff:.3g}: the cut is broken")
        kept = int(tokens.argmax(dim=-1).max()) + 1
        print(f"| {batch} | {kept} | {full:.2f} | {cut:.2f} | {full / cut:.1f}x |")


if __name__ == "__main__":
    main()
