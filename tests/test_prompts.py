"""Zero-shot prompts: class lists, synonyms and the CONCH / mSTAR prompt layouts (dict or .json file) are read
as the classes they name, scored by the recipe (checked against a hand computation), and anything that cannot
be read as labels raises instead of becoming a label."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import pipeline

import mstar_hf  # noqa: F401  (registers the tasks)
from mstar_hf.data import ZERO_SHOT_TEMPLATES, MStarProcessor, train_report_tokenizer
from mstar_hf.pipelines.prompts import DEFAULT_TEMPLATES, parse_candidate_labels
from mstar_hf.presets import mstar_config

CONCH = {"0": {"classnames": {"LUAD": ["lung adenocarcinoma", "adenocarcinoma"],
                              "LUSC": ["lung squamous cell carcinoma", "squamous cell carcinoma"]},
               "templates": ["CLASSNAME.", "an H&E image of CLASSNAME.", "a photomicrograph showing CLASSNAME."]}}
NUMBERED = {"0": CONCH["0"],
            "1": {"classnames": {"LUSC": ["squamous cell carcinoma"], "LUAD": ["adenocarcinoma"]},
                  "templates": ["CLASSNAME is shown."]}}


@pytest.fixture(scope="module")
def zs():
    reports = ["lung adenocarcinoma with glands", "lung squamous cell carcinoma with keratin pearls",
               "an H&E image", "a photomicrograph showing tissue"]
    tokenizer = train_report_tokenizer(reports, vocab_size=80)
    torch.manual_seed(0)
    model = _tiny_model(len(tokenizer))
    return pipeline("wsi-zero-shot", model=model, processor=MStarProcessor(tokenizer=tokenizer, max_length=64),
                    device="cpu")


def _tiny_model(vocab_size):
    from mstar_hf import MStarModel

    return MStarModel(mstar_config("tiny", num_genes=8, vocab_size=vocab_size)).eval()


def _class_embedding(zs, synonyms, templates):
    prompts = [t.replace("CLASSNAME", s) for s in synonyms for t in templates]
    enc = zs.tokenizer(prompts, padding=True, return_token_type_ids=False, return_tensors="pt")
    with torch.no_grad():
        text = zs.model.get_text_features(enc["input_ids"], enc["attention_mask"], normalize=True)
    return F.normalize(text.mean(0), dim=-1)


def _slide_scores(zs, x, classes):
    with torch.no_grad():
        slide = F.normalize(zs.model.slide_projection(zs.model.aggregator(x[None]).slide_embeds), dim=-1)[0]
    return (slide @ classes.T / 0.07).softmax(-1)


def test_default_templates_are_the_packages():
    assert DEFAULT_TEMPLATES == tuple(ZERO_SHOT_TEMPLATES)


def test_conch_layout_is_read_as_its_classes(tmp_path):
    parsed = parse_candidate_labels(CONCH)
    assert parsed.labels == ("LUAD", "LUSC")  # not the set number "0"
    assert parsed.sets == ((tuple(tuple(v) for v in CONCH["0"]["classnames"].values()),
                            tuple(CONCH["0"]["templates"])),)
    path = tmp_path / "nsclc_prompts.json"
    path.write_text(json.dumps(CONCH))
    assert parse_candidate_labels(str(path)) == parsed == parse_candidate_labels(path)  # a path, not one label
    assert parse_candidate_labels(CONCH["0"]) == parsed  # the unnumbered set
    numbered = parse_candidate_labels(NUMBERED)
    assert numbered.labels == ("LUAD", "LUSC") and len(numbered.sets) == 2
    assert numbered.sets[1] == ((("adenocarcinoma",), ("squamous cell carcinoma",)), ("CLASSNAME is shown.",))
    synonyms = parse_candidate_labels({"a": "alpha", "b": ["beta", "b"]})
    assert synonyms.labels == ("a", "b") and synonyms.sets == (((("alpha",), ("beta", "b")), None),)
    assert parse_candidate_labels("{}-free label").labels == ("{}-free label",)


@pytest.mark.parametrize("bad, error, match", [
    (42, TypeError, "got int"),
    ({"a", "b"}, TypeError, "got set"),
    (b"abc", TypeError, "got bytes"),
    ([{"a": 1}], TypeError, "must hold class names"),
    (["a", 3], TypeError, "must hold class names"),
    ({"a": 1}, TypeError, "synonyms of 'a'"),
    ({"a": {"b": 1}}, ValueError, "prompt set must be a dict with 'classnames'"),
    ({"0": {"templates": ["CLASSNAME."]}}, ValueError, "'classnames'"),
    ({"0": {"classnames": ["a", "b"]}}, TypeError, "'classnames' must be a dict"),
    ({"0": {"classnames": {"a": ["a"]}, "templates": ["no slot"]}}, ValueError, "slot"),
    ({"0": {"classnames": {"a": ["a"]}, "prompts": []}}, ValueError, "unknown key"),
    ({"0": {"classnames": {"a": ["a"]}}, "1": {"classnames": {"b": ["b"]}}}, ValueError, "same classes"),
    ({"a": ["a"], "0": {"classnames": {"a": ["a"]}}}, ValueError, "mixes"),
    ([], ValueError, "is empty"),
    ({"0": {"classnames": {}}}, ValueError, "is empty"),
    ("missing_prompts.json", FileNotFoundError, "no such prompt file"),
])
def test_bogus_candidate_labels_raise(bad, error, match):
    with pytest.raises(error, match=match):
        parse_candidate_labels(bad)


def test_bad_prompt_files_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: not a valid JSON"):
        parse_candidate_labels(broken)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3")
    with pytest.raises(ValueError, match=r"scalar\.json: a prompt file must hold"):
        parse_candidate_labels(scalar)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"0": {"classnames": {"a": 5}}}))
    with pytest.raises(TypeError, match=r"wrong\.json, prompt set '0': the synonyms of 'a'"):
        parse_candidate_labels(wrong)


def test_zero_shot_from_a_conch_prompt_file_in_one_call(zs, tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(CONCH))
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(2))
    out = zs(x, candidate_labels=str(path), mode="slide")
    assert sorted(d["label"] for d in out) == ["LUAD", "LUSC"]
    classes = torch.stack([_class_embedding(zs, syn, CONCH["0"]["templates"])
                           for syn in CONCH["0"]["classnames"].values()])
    want = dict(zip(["LUAD", "LUSC"], _slide_scores(zs, x, classes).tolist()))
    for d in out:
        assert d["score"] == pytest.approx(want[d["label"]], rel=1e-4, abs=1e-6)
    assert zs(x, candidate_labels=CONCH, mode="slide") == out  # the dict as it is, same result


def test_numbered_sets_average_their_class_embeddings(zs):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    per_set = []
    for prompt_set in NUMBERED.values():
        names = prompt_set["classnames"]
        per_set.append(torch.stack([_class_embedding(zs, names[label], prompt_set["templates"])
                                    for label in ("LUAD", "LUSC")]))
    classes = F.normalize(torch.stack(per_set).mean(0), dim=-1)
    torch.testing.assert_close(zs.get_class_embeddings(NUMBERED), classes, rtol=1e-5, atol=1e-6)
    out = {d["label"]: d["score"] for d in zs(x, candidate_labels=NUMBERED, mode="slide")}
    np.testing.assert_allclose([out["LUAD"], out["LUSC"]], _slide_scores(zs, x, classes).numpy(), rtol=1e-4)


def test_hypothesis_template_as_in_transformers(zs):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    labels = ["adenocarcinoma", "squamous cell carcinoma"]
    a = zs(x, candidate_labels=labels, hypothesis_template="an H&E image of {}.", mode="slide")
    b = zs(x, candidate_labels=labels, templates=["an H&E image of CLASSNAME."], mode="slide")
    assert a == b
    classes = torch.stack([_class_embedding(zs, [label], ["an H&E image of CLASSNAME."]) for label in labels])
    want = dict(zip(labels, _slide_scores(zs, x, classes).tolist()))
    assert all(d["score"] == pytest.approx(want[d["label"]], rel=1e-4) for d in a)
    with pytest.raises(ValueError, match="its own templates"):
        zs(x, candidate_labels=CONCH, hypothesis_template="a {}.")
