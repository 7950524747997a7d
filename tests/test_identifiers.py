"""trainer/identifiers.py: the pure-Python CLIP tokenizer and the identifier proposals and checks."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from comfyui_dreambooth_lora.trainer import identifiers as ids
from dreambooth_test_support.paths import REPO_ROOT, child_env


@pytest.fixture(scope="module")
def tok() -> ids.ClipBpe:
    return ids.load_tokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer():  # noqa: ANN201 - transformers type
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(ids.TOKENIZER_DIR), model_max_length=77)


def test_known_token_ids(tok: ids.ClipBpe) -> None:
    # Ids of openai/clip-vit-large-patch14, the tokenizer SD1.x ships.
    assert tok.encode("a photo of sks dog") == [320, 1125, 539, 48136, 1929]
    assert tok.tokenize("dog") == ["dog</w>"]
    assert tok.encode("zwx") == [89, 3561]  # 'z' + 'wx': two tokens


def test_matches_transformers_tokenizer(tok: ids.ClipBpe, hf_tokenizer) -> None:  # noqa: ANN001
    rng = random.Random(1234)
    words = [tok.token_text(t) for t in tok.vocab if t.endswith("</w>") and tok.token_text(t).isascii()]
    texts = [
        "a photo of sks dog",
        "Hello, world! it's 2024 and we're at the CAFÉ",
        "ohwx man in the style of <lora:x:0.8>, __under__score, 3.14 rn",
        "naïve Zürich 東京 emoji 😀 end.",
        "  lots   of\twhitespace\n and &amp; entities ",
    ]
    texts += [" ".join(rng.sample(words, 8)) for _ in range(150)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    texts += ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(1500)]
    mismatches = [
        (t, tok.encode(t), hf_tokenizer(t, add_special_tokens=False)["input_ids"])
        for t in texts
        if tok.encode(t) != hf_tokenizer(t, add_special_tokens=False)["input_ids"]
    ]
    assert not mismatches, mismatches[:5]


def test_candidates_are_single_rare_whole_word_tokens(tok: ids.ClipBpe) -> None:
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
        "spec = importlib.util.spec_from_file_location('ids_copy', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['ids_copy'] = m\n"
        "spec.loader.exec_module(m)\n"
        "print(','.join(m.candidate_identifiers()[:50]))\n"
    )
    env = child_env({"PYTHONHASHSEED": "12345"})
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO_ROOT / "trainer" / "identifiers.py")],
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
    assert "caf" in text and "Ã" not in text  # byte-level characters decoded


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
