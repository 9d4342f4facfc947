"""Text helpers: the synthetic cancer types, their zero-shot class names and prompt templates,
pathology-style report writing, and a small word-level tokenizer builder.

The cancer types look like real ones so that reports, class prompts and a pretrained BERT agree on
the words. Types are used in order: a cohort of K types uses the first K of `CANCER_TYPES`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

# key -> display name, class synonyms (zero-shot prompts), organ/procedures, type-specific findings,
# immunohistochemistry. Pairs of types share an organ, so reports share vocabulary across types.
CANCER_TYPES: list[dict] = [
    {
        "key": "adenocarcinoma",
        "name": "adenocarcinoma",
        "synonyms": ["adenocarcinoma", "lung adenocarcinoma", "invasive adenocarcinoma", "glandular carcinoma"],
        "organ": "lung",
        "procedures": ["right upper lobe, lobectomy", "left lower lobe, lobectomy", "wedge resection"],
        "findings": [
            "malignant glands with acinar architecture",
            "tumor cells forming irregular glands and papillary structures",
            "intracytoplasmic mucin droplets",
            "lepidic growth along alveolar walls at the periphery",
            "columnar tumor cells with vesicular nuclei",
            "gland-forming neoplasm infiltrating the surrounding parenchyma",
        ],
        "ihc": ["TTF-1 positive", "Napsin A positive", "CK7 positive", "p40 negative"],
    },
    {
        "key": "squamous_cell_carcinoma",
        "name": "squamous cell carcinoma",
        "synonyms": ["squamous cell carcinoma", "lung squamous cell carcinoma", "keratinizing squamous carcinoma",
                     "epidermoid carcinoma"],
        "organ": "lung",
        "procedures": ["left upper lobe, lobectomy", "right lower lobe, lobectomy", "pneumonectomy"],
        "findings": [
            "sheets and nests of atypical squamous cells",
            "keratin pearl formation",
            "intercellular bridges between polygonal tumor cells",
            "abundant eosinophilic cytoplasm with individual cell keratinization",
            "solid nests with central keratinization",
            "pleomorphic squamous cells with large hyperchromatic nuclei",
        ],
        "ihc": ["p40 positive", "CK5/6 positive", "TTF-1 negative", "p63 positive"],
    },
    {
        "key": "clear_cell_carcinoma",
        "name": "clear cell renal cell carcinoma",
        "synonyms": ["clear cell renal cell carcinoma", "clear cell carcinoma", "renal clear cell carcinoma",
                     "conventional renal cell carcinoma"],
        "organ": "kidney",
        "procedures": ["left, radical nephrectomy", "right, partial nephrectomy", "right, radical nephrectomy"],
        "findings": [
            "nests of tumor cells with optically clear cytoplasm",
            "a delicate arborizing capillary network",
            "clear cells with distinct cell membranes",
            "compact alveolar growth separated by thin vascular septa",
            "small round nuclei within abundant clear cytoplasm",
            "golden-yellow cut surface with areas of hemorrhage",
        ],
        "ihc": ["CAIX positive", "PAX8 positive", "CD10 positive", "CK7 negative"],
    },
    {
        "key": "papillary_carcinoma",
        "name": "papillary renal cell carcinoma",
        "synonyms": ["papillary renal cell carcinoma", "papillary carcinoma", "papillary RCC",
                     "renal papillary carcinoma"],
        "organ": "kidney",
        "procedures": ["left, partial nephrectomy", "right, radical nephrectomy"],
        "findings": [
            "papillae with fibrovascular cores",
            "foamy macrophages within papillary cores",
            "scattered psammoma bodies",
            "tubulopapillary architecture lined by cuboidal cells",
            "basophilic tumor cells with scant cytoplasm",
        ],
        "ihc": ["AMACR positive", "CK7 positive", "PAX8 positive"],
    },
    {
        "key": "urothelial_carcinoma",
        "name": "urothelial carcinoma",
        "synonyms": ["urothelial carcinoma", "high-grade urothelial carcinoma", "transitional cell carcinoma",
                     "bladder urothelial carcinoma"],
        "organ": "urinary bladder",
        "procedures": ["radical cystectomy", "transurethral resection"],
        "findings": [
            "invasion into the muscularis propria",
            "nests of urothelial cells with marked nuclear pleomorphism",
            "high-grade papillary and solid growth",
            "frequent mitoses and tumor necrosis",
            "carcinoma in situ of the adjacent urothelium",
        ],
        "ihc": ["GATA3 positive", "CK7 positive", "CK20 positive"],
    },
    {
        "key": "hepatocellular_carcinoma",
        "name": "hepatocellular carcinoma",
        "synonyms": ["hepatocellular carcinoma", "liver cancer", "HCC", "hepatoma"],
        "organ": "liver",
        "procedures": ["segmentectomy", "right hepatectomy"],
        "findings": [
            "thickened trabeculae of hepatocyte-like cells",
            "bile production by tumor cells",
            "pseudoglandular structures",
            "loss of reticulin framework",
            "sinusoidal capillarization",
        ],
        "ihc": ["HepPar-1 positive", "Arginase-1 positive", "Glypican-3 positive"],
    },
    {
        "key": "ductal_carcinoma",
        "name": "invasive ductal carcinoma",
        "synonyms": ["invasive ductal carcinoma", "breast ductal carcinoma", "invasive carcinoma of no special type",
                     "ductal carcinoma"],
        "organ": "breast",
        "procedures": ["left, lumpectomy", "right, mastectomy"],
        "findings": [
            "infiltrating cords and tubules in desmoplastic stroma",
            "moderate tubule formation",
            "associated ductal carcinoma in situ",
            "cohesive nests of pleomorphic ductal cells",
            "stromal desmoplasia around infiltrating tumor cells",
        ],
        "ihc": ["ER positive", "PR positive", "HER2 negative", "GATA3 positive"],
    },
    {
        "key": "serous_carcinoma",
        "name": "high-grade serous carcinoma",
        "synonyms": ["high-grade serous carcinoma", "serous carcinoma", "ovarian serous carcinoma",
                     "serous adenocarcinoma"],
        "organ": "ovary",
        "procedures": ["bilateral salpingo-oophorectomy", "debulking"],
        "findings": [
            "slit-like spaces lined by atypical cells",
            "solid and papillary growth with marked atypia",
            "numerous mitoses including atypical forms",
            "micropapillary tufts with psammoma bodies",
        ],
        "ihc": ["WT1 positive", "PAX8 positive", "p53 aberrant"],
    },
    {
        "key": "melanoma",
        "name": "melanoma",
        "synonyms": ["melanoma", "malignant melanoma", "cutaneous melanoma", "invasive melanoma"],
        "organ": "skin",
        "procedures": ["wide local excision", "excisional biopsy"],
        "findings": [
            "epithelioid melanocytes with prominent nucleoli",
            "melanin pigment within tumor cells",
            "pagetoid spread of atypical melanocytes",
            "dermal nests lacking maturation",
        ],
        "ihc": ["SOX10 positive", "Melan-A positive", "HMB-45 positive"],
    },
    {
        "key": "glioblastoma",
        "name": "glioblastoma",
        "synonyms": ["glioblastoma", "glioblastoma multiforme", "grade 4 astrocytoma", "high-grade glioma"],
        "organ": "brain",
        "procedures": ["left frontal lobe, resection", "right temporal lobe, resection"],
        "findings": [
            "microvascular proliferation",
            "pseudopalisading necrosis",
            "highly cellular infiltrating astrocytic tumor",
            "marked nuclear atypia with brisk mitotic activity",
        ],
        "ihc": ["GFAP positive", "IDH1 R132H negative", "ATRX retained"],
    },
]

# MI-Zero-style templates ("CLASSNAME" is replaced by each class synonym).
ZERO_SHOT_TEMPLATES: list[str] = [
    "CLASSNAME.",
    "an image of CLASSNAME.",
    "an H&E image of CLASSNAME.",
    "an H&E stained image of CLASSNAME.",
    "a histopathological image of CLASSNAME.",
    "a histopathology slide showing CLASSNAME.",
    "a photomicrograph showing CLASSNAME.",
    "presence of CLASSNAME tissue.",
    "an example of CLASSNAME.",
    "CLASSNAME is shown.",
    "a whole slide image of CLASSNAME.",
    "tissue section of CLASSNAME, H&E stain.",
]

# Vocabulary shared by every type: what a report says regardless of the diagnosis.
_GRADES = ["well differentiated", "moderately differentiated", "poorly differentiated"]
_SHARED = [
    "Margins of resection are negative for tumor.",
    "The tumor extends to within {d} cm of the closest margin.",
    "Lymphovascular invasion is {lvi}.",
    "{n} of {m} lymph nodes are involved by tumor.",
    "Focal tumor necrosis is present.",
    "No tumor necrosis is identified.",
    "Perineural invasion is not identified.",
    "The background tissue shows chronic inflammation.",
    "Tumor size: {s} cm in greatest dimension.",
]


def num_available_types() -> int:
    return len(CANCER_TYPES)


def cancer_type_specs(num_types: int) -> list[dict]:
    """The first `num_types` cancer types."""
    if not 1 <= num_types <= len(CANCER_TYPES):
        raise ValueError(f"num_types must be between 1 and {len(CANCER_TYPES)}, got {num_types}.")
    return CANCER_TYPES[:num_types]


def cancer_type_keys(num_types: int) -> list[str]:
    return [t["key"] for t in cancer_type_specs(num_types)]


def class_prompts(types: int | Sequence[str]) -> dict[str, list[str]]:
    """{type key: class synonyms} for zero-shot classification (the class names of the prompts)."""
    keys = cancer_type_keys(types) if isinstance(types, int) else list(types)
    by_key = {t["key"]: t for t in CANCER_TYPES}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise KeyError(f"unknown cancer type(s) {unknown}; known: {list(by_key)}.")
    return {k: list(by_key[k]["synonyms"]) for k in keys}


def zero_shot_prompts(types: int | Sequence[str], templates: Sequence[str] = ZERO_SHOT_TEMPLATES
                      ) -> dict[str, list[str]]:
    """{type key: every (template x synonym) prompt}."""
    return {k: [t.replace("CLASSNAME", s) for t in templates for s in syns]
            for k, syns in class_prompts(types).items()}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _shared_sentences(rng: np.random.Generator, k: int) -> list[str]:
    chosen = rng.choice(len(_SHARED), size=k, replace=False)
    out = []
    for i in chosen:
        m = int(rng.integers(3, 20))
        out.append(_SHARED[i].format(d=round(float(rng.uniform(0.1, 2.5)), 1),
                                     lvi=_pick(rng, ["present", "not identified", "indeterminate"]),
                                     n=int(rng.integers(0, min(m, 5) + 1)), m=m,
                                     s=round(float(rng.uniform(0.8, 9.5)), 1)))
    return out


def write_report(type_key: str, rng: np.random.Generator) -> str:
    """A pathology-style report for a case of `type_key`, in one of several styles.

    Only the type drives the content (diagnosis wording, organ, findings, IHC); sizes, grades, margins
    and node counts are drawn at random, so a report carries no other information about the case.
    """
    spec = next((t for t in CANCER_TYPES if t["key"] == type_key), None)
    if spec is None:
        raise KeyError(f"unknown cancer type {type_key!r}.")
    dx = _pick(rng, spec["synonyms"])
    grade = _pick(rng, _GRADES)
    site = f"{spec['organ'].capitalize()}, {_pick(rng, spec['procedures'])}"
    n_findings = int(rng.integers(2, min(4, len(spec["findings"])) + 1))
    findings = [spec["findings"][i] for i in rng.choice(len(spec["findings"]), size=n_findings, replace=False)]
    ihc = [spec["ihc"][i] for i in rng.choice(len(spec["ihc"]), size=int(rng.integers(1, 3)), replace=False)]
    shared = _shared_sentences(rng, int(rng.integers(1, 4)))
    style = int(rng.integers(4))
    if style == 0:  # synoptic
        lines = ["FINAL DIAGNOSIS:", f"{site}:", f"- {dx.capitalize()}, {grade}.",
                 "MICROSCOPIC DESCRIPTION:"] + [f"- {f.capitalize()}." for f in findings]
        lines += ["IMMUNOHISTOCHEMISTRY: " + ", ".join(ihc) + "."] + shared
        return "\n".join(lines)
    if style == 1:  # narrative
        text = (f"Sections of the {spec['organ']} show {findings[0]}"
                + "".join(f", {f}" for f in findings[1:-1]) + (f" and {findings[-1]}" if len(findings) > 1 else "")
                + f". The features are those of {dx}, {grade}. Immunostains: {', '.join(ihc)}. " + " ".join(shared))
        return text
    if style == 2:  # diagnosis first, short
        return (f"DIAGNOSIS: {site} - {dx.upper()}. Histologic grade: {grade}. "
                + " ".join(f.capitalize() + "." for f in findings) + " " + " ".join(shared))
    # comment style
    return (f"Specimen: {site}. Microscopic: {'; '.join(findings)}. " + " ".join(shared)
            + f" Tumor cells are {' and '.join(ihc)}. COMMENT: The morphology and immunoprofile support {dx}.")


def train_report_tokenizer(reports: Iterable[str], vocab_size: int = 4096, min_frequency: int = 1,
                           lowercase: bool = True, model_max_length: int = 512):
    """Train a word-level BERT-style tokenizer on reports, for when no pretrained BERT is available.

    Special tokens [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4; BERT normalisation and
    pre-tokenisation (words and punctuation); `[CLS] A [SEP]` post-processing. Returns a
    `PreTrainedTokenizerFast` that saves with `save_pretrained` and loads with `AutoTokenizer`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if vocab_size <= len(specials):
        raise ValueError(f"vocab_size must exceed the {len(specials)} special tokens, got {vocab_size}.")
    reports = [r for r in reports if isinstance(r, str) and r.strip()]
    if not reports:
        raise ValueError("train_report_tokenizer needs at least one non-empty report.")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials)
    tok.train_from_iterator(reports, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length, padding_side="right",
        model_input_names=["input_ids", "attention_mask"])


__all__ = [
    "CANCER_TYPES",
    "ZERO_SHOT_TEMPLATES",
    "cancer_type_keys",
    "cancer_type_specs",
    "class_prompts",
    "num_available_types",
    "train_report_tokenizer",
    "write_report",
    "zero_shot_prompts",
]
