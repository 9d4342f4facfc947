#!/usr/bin/env python
"""Measure what method.md leaves open in Stage 2, on a finished demo folder: the regression loss (cosine vs
smooth-L1), the teacher's target (`--teacher_target`), centred targets, H&E stain augmentation and the number
of steps.

Each variant runs `training/stage2.py`'s `main` from the demo's Stage 1 model on the demo's cohort,
re-extracts the cohort's features with its encoder, and is judged on the held-out (val + test) cases
exactly as the demo judges its own Stage 2 (`demo_eval`): the downstream protocols on mean-pooled
features (linear probe, few-shot k = 1 prototypes, ABMIL; initial vs Stage 2 encoder, paired bootstrap
over cases) and the Stage 2 target on held-out patches (centred cosine, R^2, patch retrieval@1 beside
predicting the mean target). One table, one row per variant.

    mstar-hf demo --out demo_out
    python bench/stage2_variants.py --demo demo_out                      # the default grid
    python bench/stage2_variants.py --demo demo_out --variant "cosine:--loss cosine" --variant "..."
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from pathlib import Path

DEFAULT_VARIANTS = (
    ("cosine (demo)", "--loss cosine"),
    ("smooth-L1", "--loss smooth_l1"),
    ("centred cosine", "--loss cosine --center_targets true"),
    ("centred cosine + stain jitter, 5x steps", "--loss cosine --center_targets true --stain_jitter 0.2 --steps x5"),
)


def demo_default_variant() -> tuple[str, str]:
    """The Stage 2 settings the demo runs with (`DemoSettings`), as a variant: read, not copied."""
    from mstar_hf.demo import DemoSettings

    d = DemoSettings()
    return ("demo default", f"--loss cosine --center_targets {str(d.stage2_center_targets).lower()} "
            f"--learning_rate {d.stage2_learning_rate} --ema_consistency_weight {d.stage2_consistency_weight} "
            f"--stain_jitter {d.stage2_stain_jitter} --max_train_steps {d.stage2_steps} "
            f"--init_projection {d.stage2_init_projection}")


def run_variant(demo: Path, name: str, flags: str, work: Path, steps: int, quiet: bool = True) -> dict:
    from mstar_hf import data as cohort_data
    from mstar_hf import demo_eval
    from mstar_hf.demo import _extract, _zero_shot, class_labels
    from mstar_hf.training_utils import stage2

    args = shlex.split(flags)
    if "--steps" in args:  # "--steps x5": a multiple of the demo's Stage 2 steps
        i = args.index("--steps")
        steps = steps * int(args[i + 1].lstrip("x"))
        del args[i:i + 2]
    for i, flag in enumerate(args[:-1]):  # an explicit step count wins (as in argparse, the last one)
        if flag == "--max_train_steps":
            steps = int(args[i + 1])
    out = work / name.replace(" ", "_").replace("/", "_").replace(",", "")
    if out.exists():
        shutil.rmtree(out)
    manifest = demo / "cohort" / "manifest.csv"
    t0 = time.perf_counter()
    stage2.main(["--stage1_model", str(demo / "models" / "stage1"), "--manifest", str(manifest),
                 "--output_dir", str(out), "--max_train_steps", str(steps), "--slides_per_step", "4",
                 "--per_device_train_batch_size", "32", "--learning_rate", "1e-4", "--max_eval_patches", "256",
                 "--dataloader_num_workers", "1", "--seed", "0", "--with_tracking", "false",
                 *(["--quiet"] if quiet else []), *args])
    seconds = time.perf_counter() - t0
    slides = sorted((demo / "cohort" / "slides").glob("*.tiff"))
    _extract(slides, out / "features", out / "patch_encoder", quiet)
    cohort = cohort_data.load_cohort(manifest, check_files=False)
    train = [c for c in cohort if c["split"] == "train"]
    test = [c for c in cohort if c["split"] in ("val", "test")]
    initial = (demo_eval.load_bags(train), demo_eval.load_bags(test))
    student = (demo_eval.load_bags(train, out / "features"), demo_eval.load_bags(test, out / "features"))
    downstream = demo_eval.encoder_comparison(train, test, {"initial": initial, "stage2": student})
    # the paper's zero-shot route through this encoder and its trained projection (the demo's `encoder_stage2`)
    labels = class_labels(json.loads((demo / "cohort" / "cohort.json").read_text()))
    cases = [{**c, "features_path": demo_eval.features_path(c, out / "features")} for c in test]
    zero_shot = _zero_shot(out / "mstar_model", cases, labels, "patch_topk", "encoder")
    # the fit is judged against the target this Stage 2 trained on, as its results record it
    teacher_target = json.loads((out / "stage2_results.json").read_text())["teacher_target"]
    target = demo_eval.distillation_report(demo / "models" / "stage1", out / "mstar_model", initial, student,
                                           teacher_target=teacher_target)
    return {"variant": name, "flags": flags, "steps": steps, "stage2_s": round(seconds, 1),
            "downstream": downstream, "target": target, "zero_shot_encoder": zero_shot["balanced_accuracy"]}


def table(rows: list[dict]) -> str:
    def diff(r, protocol):
        d = r["downstream"][protocol]
        return (f"{d['initial']['balanced_accuracy']:.2f}->{d['stage2']['balanced_accuracy']:.2f} "
                f"({d['difference']['delta']:+.2f} [{d['difference']['ci_low']:+.2f}, {d['difference']['ci_high']:+.2f}])")

    head = ("variant", "steps", "linear probe", "few-shot k=1", "ABMIL", "zero-shot (encoder route)", "centred cos",
            "R^2", "retrieval@1 (mean target)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        st, mt = r["target"]["stage2_student"], r["target"]["mean_target"]
        lines.append("| " + " | ".join([
            r["variant"], str(r["steps"]), diff(r, "linear_probe"), diff(r, "few_shot_k1"), diff(r, "abmil"),
            f"{r['zero_shot_encoder']:.2f}", f"{st['centred_cosine']:.3f}", f"{st['r2']:.3f}",
            f"{st['retrieval@1']:.3f} ({mt['retrieval@1']:.3f})"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="a finished `mstar-hf demo` folder")
    parser.add_argument("--variant", action="append", default=None,
                        help='"name:flags for training/stage2.py" (repeatable); default: the built-in grid')
    parser.add_argument("--workdir", default=None, help="where the variants train (default: DEMO/stage2_variants)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    demo = Path(args.demo)
    results = json.loads((demo / "results.json").read_text())  # a finished demo: its settings and Stage 2 steps
    steps = int(results["settings"]["stage2_steps"])
    variants = ([tuple(v.split(":", 1)) for v in args.variant] if args.variant
                else [*DEFAULT_VARIANTS, demo_default_variant()])
    work = Path(args.workdir) if args.workdir else demo / "stage2_variants"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, flags in variants:
        rows.append(run_variant(demo, name, flags, work, steps, quiet=not args.verbose))
        print(f"done: {name} ({rows[-1]['stage2_s']} s)", flush=True)
    (work / "variants.json").write_text(json.dumps(rows, indent=2, default=str))
    print(table(rows))
    print(f"(held-out cases: {rows[0]['downstream']['linear_probe']['initial']['n']}; details in {work / 'variants.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
