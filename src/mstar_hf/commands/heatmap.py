"""`mstar-hf heatmap`: zero-shot patch-score heatmaps of slides or feature h5 files.

    mstar-hf heatmap features/slide_1.h5 --model runs/stage1 --labels adenocarcinoma "squamous cell carcinoma"
    mstar-hf heatmap features/*.h5 --model runs/stage1 --prompts prompts.json --out heatmaps/ --all-labels
    mstar-hf heatmap slide.svs --model runs/stage1 --labels a b --label b --out b.png

Each input is classified by `pipeline("wsi-zero-shot")` (the installed code, see
`mstar_hf.pipelines.load_pipeline`), and the cosine of every patch with a class is drawn over the slide
thumbnail: the top class by default, `--label` for one class, `--all-labels` for every class. A feature
h5 is drawn on the slide it records (the path `mstar-hf extract` writes, or the slide's file name next to
the h5 or in the folder above); `--slide` names the slide when it has moved (one input only).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def register(subparsers):
    parser = subparsers.add_parser(
        "heatmap",
        help="zero-shot heatmaps (patch cosine with a class) of slides or feature h5 files",
        description="Classifies each input with the wsi-zero-shot pipeline and draws the per-patch cosine with "
        "a class over the slide thumbnail (PNG).",
    )
    parser.add_argument("inputs", nargs="+", help="feature .h5 files (from `mstar-hf extract`) or slide files")
    parser.add_argument("--model", required=True, help="MStarModel folder or Hub id (a Stage 1 / Stage 2 output)")
    classes = parser.add_mutually_exclusive_group(required=True)
    classes.add_argument("--labels", nargs="+", help="class names")
    classes.add_argument("--prompts", help="a .json prompt file: {label: [synonyms]} or the CONCH / mSTAR layout")
    parser.add_argument("--hypothesis-template", action="append", default=None,
                        help="prompt template with a {} or CLASSNAME slot (repeatable; default: the MI-Zero set)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--label", help="the class to draw (default: each input's top class)")
    which.add_argument("--all-labels", action="store_true", help="one heatmap per class")
    parser.add_argument("--out", default="heatmaps",
                        help="output folder, or a .png path for one input and one class (default: heatmaps/)")
    parser.add_argument("--slide", help="the slide to draw on, when the h5's recorded slide has moved (one input)")
    parser.add_argument("--mode", choices=["patch_topk", "slide"], default="patch_topk")
    parser.add_argument("--patch-source", choices=["aggregator", "encoder"], default="aggregator")
    parser.add_argument("--patch-top-k", type=int, default=50, help="patches pooled per class in patch_topk mode")
    parser.add_argument("--max-size", type=int, default=1024, help="longest side of the slide thumbnail (pixels)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity over the thumbnail")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.set_defaults(func=run)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def _fail(message: str) -> int:
    print(f"mstar-hf heatmap: error: {message}", file=sys.stderr)
    return 1


def run(args) -> int:
    import torch

    from ..pipelines import load_pipeline
    from ..pipelines.heatmap import save_zero_shot_heatmap

    inputs = [Path(p) for p in args.inputs]
    out = Path(args.out)
    single_png = out.suffix.lower() == ".png"
    if single_png and (len(inputs) > 1 or args.all_labels):
        return _fail(f"--out {out} is one PNG: give one input and one class (or an output folder).")
    if args.slide and len(inputs) > 1:
        return _fail("--slide names the slide of one input; give a single input with it.")
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        return _fail(f"no such file: {', '.join(missing)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        classifier = load_pipeline("wsi-zero-shot", args.model, device=device)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return _fail(f"cannot load the model {args.model}: {err}")
    candidate_labels = args.prompts if args.prompts else args.labels
    written = []
    for path in inputs:
        try:
            result = classifier(str(path), candidate_labels=candidate_labels, return_patch_scores=True,
                                hypothesis_template=args.hypothesis_template, mode=args.mode,
                                patch_source=args.patch_source, patch_top_k=args.patch_top_k)
            labels = [e["label"] for e in result] if args.all_labels else [args.label or result[0]["label"]]
            for label in labels:
                target = out if single_png else out / f"{_safe(path.stem)}_{_safe(label)}.png"
                png = save_zero_shot_heatmap(result, target, label=label, slide=args.slide, max_size=args.max_size,
                                             alpha=args.alpha)
                written.append(str(png))
        except (OSError, ValueError, KeyError, TypeError) as err:
            return _fail(f"{path}: {err}")
        top = ", ".join(f"{e['label']} {e['score']:.3f}" for e in result)
        print(f"{path}: {top}")
    print(json.dumps({"heatmaps": written}))
    return 0
