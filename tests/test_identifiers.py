"""trainer/identifiers.py: identifier proposals and checks on the engine's CLIP tokenizer."""

from __future__ import annotations

import subprocess
import sys

import pytest
from comfyui_dreambooth_lora.trainer import identifiers as ids
from comfyui_dreambooth_lora.trainer import tokenizer as clip_tokenizer
from dreambooth_test_support.paths import REPO_ROOT, child_env

# Accents (composed and decomposed), emoji and CJK: where a hand-written BPE once disagreed with
# transformers 4.57's CLIPTokenizer. Each transformers version has its own rules here (4.x splits CJK
# characters apart, 5.x does not), so the checks must use the library's tokenizer, not a copy.
NON_ASCII = ["café", "CAFÉ", "cafe\u0301", "naïve", "Zürich", "😀", "🐶dog", "東京", "ｚｗｘ", "ohwx_😀"]


@pytest.fixture(scope="module")
def tok() -> ids.ClipTokens:
    return ids.load_tokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer():  # noqa: ANN201 - transformers type
    """Built the way ComfyUI and diffusers build it, independently of the pack's loader."""
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(ids.TOKENIZER_DIR), model_max_length=77)


def test_uses_the_engines_tokenizer(tok: ids.ClipTokens) -> None:
    from comfyui_dreambooth_lora.trainer import models

    # One tokenizer object for training and for the checks: they cannot drift apart.
    assert tok.hf is models.load_tokenizer("sd1") is clip_tokenizer.load_tokenizer("sd1")
    assert tok.hf.model_max_length == 77  # not the 8192 transformers reports for the bare files


def test_known_token_ids(tok: ids.ClipTokens) -> None:
    # Ids of openai/clip-vit-large-patch14, the tokenizer SD1.x ships.
    assert tok.encode("a photo of sks dog") == [320, 1125, 539, 48136, 1929]
    assert tok.tokenize("dog") == ["dog</w>"]
    assert tok.encode("zwx") == [89, 3561]  # 'z' + 'wx': two tokens
    assert tok.encode("café") == [15304] and tok.encode("naïve") == [1097, 35689, 563]


@pytest.mark.parametrize("text", NON_ASCII)
def test_check_agrees_with_clip_tokenizer_on_non_ascii(text: str, hf_tokenizer) -> None:  # noqa: ANN001
    expected = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    check = ids.check_identifier(text, "dog")
    assert check.token_ids == expected
    assert len(check.tokens) == len(expected)
    # In the instance prompt the identifier's ids sit between "a photo of" and "dog" unchanged.
    in_prompt = hf_tokenizer(ids.instance_prompt(text, "dog"), add_special_tokens=False)["input_ids"]
    assert in_prompt == [320, 1125, 539, *expected, 1929]
    if len(expected) > 1:
        assert any("tokens" in p for p in check.problems), check.describe()


def test_token_text_is_readable(tok: ids.ClipTokens) -> None:
    for text in ["café", "naïve", "Zürich", "😀"]:
        pieces = [tok.token_text(t) for t in tok.tokenize(text)]
        assert "".join(pieces) == text.lower(), pieces


def test_candidates_are_the_same_with_every_transformers_version() -> None:
    # The node promises that an index names the same identifier on every machine, whichever
    # transformers the ComfyUI install has; this fingerprint was taken with 4.57 and 5.23.
    cands = ids.candidate_identifiers()
    assert len(cands) == 1866
    assert cands[:8] == ["fac", "bram", "vit", "saz", "hibs", "atan", "rion", "hya"]


def test_candidates_are_single_rare_whole_word_tokens(tok: ids.ClipTokens) -> None:
    cands = ids.candidate_identifiers()
    assert len(cands) > 500
    assert len(set(cands)) == len(cands)
    lo, hi = ids.RARE_ID_RANGE
    for word in cands:
        assert 3 <= len(word) <= 4 and word.isascii() and word.isalpha() and word.islower(), word
        token_ids = tok.encode(word)
        assert len(token_ids) == 1, (word, token_ids)
        assert lo <= token_ids[0] < hi, (word, token_ids)
        # In a prompt the identifier must stay one token too.
        assert tok.encode(ids.instance_prompt(word, "dog")) == [320, 1125, 539, token_ids[0], 1929]
        assert word not in ids.BLOCKED_WORDS and word not in ids.KNOWN_BAD
        assert ids.check_identifier(word, "dog").ok, ids.check_identifier(word, "dog").describe()


def test_candidates_are_deterministic_across_processes() -> None:
    # A fresh interpreter has a different str-hash seed; the order must not depend on it.
    code = (
        "import importlib.util, sys\n"
        "root = sys.argv[1]\n"
        "spec = importlib.util.spec_from_file_location('pack_copy', root + '/__init__.py',\n"
        "                                              submodule_search_locations=[root])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pack_copy'] = m\n"
        "spec.loader.exec_module(m)\n"
        "from pack_copy.trainer import identifiers\n"
        "print(','.join(identifiers.candidate_identifiers()[:50]))\n"
    )
    env = child_env({"PYTHONHASHSEED": "12345"})
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO_ROOT)],
        capture_output=True, text=True, env=env, check=True, timeout=120,
    ).stdout.strip()
    assert out.split(",") == ids.candidate_identifiers()[:50]
    assert ids.propose_identifier(0) == ids.candidate_identifiers()[0]
    assert ids.propose_identifier(7) == ids.propose_identifier(7)


def test_propose_wraps_and_avoids_class_noun() -> None:
    cands = ids.candidate_identifiers()
    assert ids.propose_identifier(len(cands)) == cands[0]
    first = cands[0]
    assert ids.propose_identifier(0, class_noun=f"small {first}") == cands[1]


def test_sks_is_flagged() -> None:
    check = ids.check_identifier("sks", "dog")
    assert len(check.token_ids) == 1  # one token, and still bad: a rifle prior
    assert not check.ok
    assert any("rifle" in p for p in check.problems)


def test_multi_token_identifier_is_flagged() -> None:
    check = ids.check_identifier("zwx", "dog")
    assert check.tokens == ["z", "wx"]
    assert any("2 tokens" in p for p in check.problems)
    longer = ids.check_identifier("qzvbrk")
    assert len(longer.tokens) > 1 and not longer.ok


def test_common_word_number_and_punctuation_are_flagged() -> None:
    assert any("everyday word" in p for p in ids.check_identifier("cat").problems)
    assert any("number" in p for p in ids.check_identifier("42").problems)
    assert any("punctuation" in p for p in ids.check_identifier("!!").problems)
    assert any("several words" in p for p in ids.check_identifier("my dog").problems)
    assert any("frequent token" in p for p in ids.check_identifier("photo").problems)
    assert any("class noun" in p for p in ids.check_identifier("dog", "dog").problems)
    assert not ids.check_identifier("").ok


def test_describe_shows_tokens_readably() -> None:
    text = ids.check_identifier("café").describe()
    assert "'café'" in text and "Ã" not in text and "</w>" not in text  # byte-level characters decoded


def test_prompts() -> None:
    assert ids.instance_prompt(" fac ", " dog ") == "a photo of fac dog"
    assert ids.class_prompt("dog") == "a photo of dog"


def _identifier_outputs(server, inputs: dict) -> tuple[list[str], dict]:  # noqa: ANN001
    prompt = {"1": {"class_type": "DreamBoothIdentifier", "inputs": inputs}}
    for slot in range(4):
        prompt[str(slot + 2)] = {"class_type": "PreviewAny", "inputs": {"source": ["1", slot]}}
    result = server.run_prompt(prompt, timeout=120)
    return [result.outputs.get(str(slot + 2), {}).get("text", [None])[0] for slot in range(4)], result


@pytest.mark.comfy
def test_node_proposes_and_builds_prompts(comfy_server) -> None:  # noqa: ANN001
    info = comfy_server.object_info("DreamBoothIdentifier")["DreamBoothIdentifier"]
    assert info["category"] == "DreamBooth/dataset"
    assert info["output_name"] == ["identifier", "instance_prompt", "class_prompt", "report"]
    specs = [*info["input"]["required"].values(), *info["input"].get("optional", {}).values()]
    assert all(spec[1].get("tooltip") for spec in specs), specs

    (ident, instance, klass, report), result = _identifier_outputs(
        comfy_server, {"class_noun": "dog", "index": 3, "identifier": ""}
    )
    assert result.status == "success", result.error
    assert ident == ids.propose_identifier(3, "dog")
    assert instance == f"a photo of {ident} dog"
    assert klass == "a photo of dog"
    assert ident in report and "rare" in report


@pytest.mark.comfy
def test_node_warns_about_sks(comfy_server) -> None:  # noqa: ANN001
    (ident, instance, _klass, report), result = _identifier_outputs(
        comfy_server, {"class_noun": "dog", "index": 0, "identifier": "sks"}
    )
    assert result.status == "success", result.error
    assert ident == "sks" and instance == "a photo of sks dog"  # the user's choice is kept
    assert "rifle" in report
    assert repr(ids.propose_identifier(0, "dog")) in report  # and a better one is offered


@pytest.mark.comfy
def test_node_rejects_empty_class_noun(comfy_server) -> None:  # noqa: ANN001
    _outputs, result = _identifier_outputs(comfy_server, {"class_noun": "  ", "index": 0, "identifier": ""})
    assert result.status == "error"
    assert "class_noun is empty" in str(result.error.get("exception_message"))


def test_an_identifier_is_the_same_tokens_for_both_sdxl_encoders() -> None:
    # SDXL's CLIP-L and OpenCLIP bigG share CLIP's vocabulary and differ only in padding, so one check
    # of an identifier holds for both encoders.
    first, second = clip_tokenizer.tokenizers_for("sdxl")
    assert (first.pad_token, second.pad_token) == ("<|endoftext|>", "!")
    for identifier in [*ids.candidate_identifiers()[:20], "sks", "ohwx", *NON_ASCII]:
        prompt = ids.instance_prompt(identifier, "dog")
        a = first(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        b = second(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        end = a.index(49407)
        assert a[:end + 1] == b[:end + 1], identifier
        assert set(a[end + 1:]) <= {49407} and set(b[end + 1:]) <= {0}
