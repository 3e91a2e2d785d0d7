"""The offline CLIP tokenizer against open_clip and Hugging Face, plus its package data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from sun_edge.errors import SunEdgeError
from sun_edge.tokenizer import (
    CLIPTokenizer,
    PromptTruncatedWarning,
    clean_text,
    write_tokenizer_files,
)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "sun_edge" / "data"
SCRIPT = REPO / "scripts" / "make_vocab.py"
BOS, EOS = 49406, 49407

LONG_PROMPT = "a photo of " + ", ".join(["a red apple on a wooden table"] * 12) + ", and one final purple zebra"

PROMPTS = [
    "a photo of a cat",
    "a cat, (masterpiece:1.2), [blurry]!!! -- 100%",
    "((best quality)), 8k uhd, dslr, {{lowres}}, bad_hands, worst-quality...",
    "café crème, naïve façade, Ångström, São Paulo",
    "a cute dog 🐶🔥 with ❤️ and 👍🏽",
    "猫の写真, 一只可爱的小猫, 고양이 사진",
    "schÃ¶n and cafÃ©",  # mojibake that ftfy fixes
    "The Quick BROWN fox's tail, it's 3.14159 meters & 42 cm, 1/2 or 1,000,000 in 2024",
    "Tom &amp; Jerry &lt;3 &amp;amp; &quot;quoted&quot; &#39;apos&#39;",
    "   lots\tof \n\n whitespace   ",
    "",
    "it's, we're, they've, I'm, you'll, he'd, don't",
    LONG_PROMPT,
]
# Prompts Hugging Face's fast tokenizer handles like CLIP without pre-cleaning: no HTML entities, no mojibake.
HF_RAW_PROMPTS = [p for p in PROMPTS if "&" not in p and "Ã" not in p]


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def open_clip_tok():
    """open_clip's SimpleTokenizer, loaded by file path (its package __init__ needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """transformers' CLIPTokenizer built from OUR files, with SD1.5's pad token."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    write_tokenizer_files(directory)
    # Note: transformers 5 ignores CLIPTokenizer(vocab_file=..., merges_file=...) and silently builds a
    # 3-token vocab; from_pretrained on a directory reads the files.
    hf = transformers.CLIPTokenizer.from_pretrained(directory, pad_token="<|endoftext|>", local_files_only=True)
    assert len(hf) == 49408 and hf.pad_token_id == EOS
    return hf


def hf_ids(hf, text: str) -> np.ndarray:
    return hf(text, padding="max_length", truncation=True, max_length=77, return_tensors="np").input_ids


# ---- package data -------------------------------------------------------------------------------------


def test_vocab_files_have_clip_sizes():
    vocab = json.loads((DATA / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert sorted(vocab.values()) == list(range(49408))
    lines = (DATA / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2"
    assert len(lines) - 1 == 48894
    assert all(len(line.split()) == 2 for line in lines[1:])
    assert (DATA / "vocab.json").stat().st_size == 961143


def test_make_vocab_script_reproduces_shipped_files(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_write_tokenizer_files_copies_package_data(tmp_path):
    paths = write_tokenizer_files(tmp_path / "bundle")
    assert [p.name for p in paths] == ["vocab.json", "merges.txt"]
    for p in paths:
        assert p.read_bytes() == (DATA / p.name).read_bytes()
    reloaded = CLIPTokenizer.from_dir(tmp_path / "bundle")
    assert reloaded.encode(PROMPTS[1]).tolist() == CLIPTokenizer.default().encode(PROMPTS[1]).tolist()


# ---- parity with the references -----------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_open_clip_except_padding(tok, open_clip_tok, prompt):
    ours = _quiet_encode(tok, prompt)
    ref = open_clip_tok(prompt).numpy()  # open_clip pads with 0, SD1.5 with EOS
    assert ours.shape == ref.shape == (1, 77) and ours.dtype == np.int64
    n = int(np.flatnonzero(ref[0] == EOS)[0]) + 1  # BOS, tokens, EOS; not counting zeros: "!" is id 0
    np.testing.assert_array_equal(ours[0, :n], ref[0, :n])
    assert (ours[0, n:] == EOS).all() and (ref[0, n:] == 0).all()


@pytest.mark.parametrize("prompt", HF_RAW_PROMPTS + ["a<|endoftext|>b <|startoftext|> c"])
def test_ids_match_hugging_face(tok, hf_tok, prompt):
    np.testing.assert_array_equal(_quiet_encode(tok, prompt), hf_ids(hf_tok, prompt))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_hugging_face_on_cleaned_text(tok, hf_tok, prompt):
    # HF's fast tokenizer skips ftfy and html.unescape; given CLIP-cleaned text it must agree everywhere.
    np.testing.assert_array_equal(_quiet_encode(tok, prompt), hf_ids(hf_tok, clean_text(prompt)))


# ---- behaviour ----------------------------------------------------------------------------------------


def test_padding_and_special_tokens(tok):
    ids = tok("a photo of a cat")
    assert ids.tolist()[0][:7] == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert (ids[0, 7:] == EOS).all()
    assert tok.encode("")[0].tolist() == [BOS] + [EOS] * 76
    assert tok.tokenize("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_truncation_warns_with_cut_text(tok):
    tokens = tok.tokenize(LONG_PROMPT)
    assert len(tokens) > 75
    with pytest.warns(PromptTruncatedWarning) as record:
        ids = tok.encode(LONG_PROMPT)
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith("prompt is longer than 77 tokens")
    assert "this part was cut:" in message and "one final purple zebra" in message
    assert tok.decode(tokens[75:]) in message
    assert issubclass(PromptTruncatedWarning, UserWarning)
    assert record[0].filename == __file__  # points at the caller
    assert ids.shape == (1, 77) and ids[0, 0] == BOS and ids[0, -1] == EOS
    assert ids[0, 1:76].tolist() == tokens[:75]


def test_no_warning_at_exactly_77_tokens(tok):
    prompt = " ".join(["cat"] * 75)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tok.encode(prompt)
    assert ids[0, -1] == EOS and (ids[0, 1:76] == tok.tokenize("cat")[0]).all()
    with pytest.warns(PromptTruncatedWarning, match="'cat'"):
        tok.encode(prompt + " cat")


def test_other_max_length(tok):
    ids = tok.encode("a photo of a cat", max_length=10)
    assert ids[0].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS, EOS, EOS, EOS]
    with pytest.warns(PromptTruncatedWarning, match="'a cat'"):
        assert tok.encode("a photo of a cat", max_length=5)[0].tolist() == [BOS, 320, 1125, 539, EOS]
    with pytest.raises(SunEdgeError):
        tok.encode("x", max_length=1)


@pytest.mark.parametrize("prompt", PROMPTS[:-1])
def test_decode_round_trips_cleaned_words(tok, prompt):
    decoded = tok.decode(tok.encode(prompt)[0])
    assert decoded.replace(" ", "") == clean_text(prompt).replace(" ", "")


def test_decode_keeps_specials_on_request_and_rejects_bad_ids(tok):
    assert tok.decode([BOS, 320, 2368, EOS], skip_special_tokens=False) == "<|startoftext|>a cat <|endoftext|>"
    with pytest.raises(SunEdgeError, match="outside the vocabulary"):
        tok.decode([49408])


def test_clean_text():
    assert clean_text("  Tom &amp;amp; JERRY\n\tschÃ¶n ") == "tom & jerry schön"


# ---- errors and import hygiene ------------------------------------------------------------------------


def test_missing_and_corrupt_files_raise_one_line_errors(tmp_path):
    with pytest.raises(SunEdgeError, match="not found") as err:
        CLIPTokenizer.from_files(tmp_path / "nope.json", DATA / "merges.txt")
    assert "\n" not in str(err.value)
    bad_json = tmp_path / "vocab.json"
    bad_json.write_text('{"a": 0,', encoding="utf-8")
    with pytest.raises(SunEdgeError, match="not valid JSON") as err:
        CLIPTokenizer.from_files(bad_json, DATA / "merges.txt")
    assert "\n" not in str(err.value)
    bad_json.write_text('{"a": 0, "b": 1}', encoding="utf-8")
    with pytest.raises(SunEdgeError, match="is malformed or not in the vocab"):
        CLIPTokenizer.from_files(bad_json, DATA / "merges.txt")
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version: 0.2\ni n\nthree parts here\n", encoding="utf-8")
    with pytest.raises(SunEdgeError, match="merge 1"):
        CLIPTokenizer.from_files(DATA / "vocab.json", bad_merges)
    bad_merges.write_text("#version: 0.2\ni n\n", encoding="utf-8")
    small = {t: i for i, t in enumerate(["i", "n", "in", "<|startoftext|>", "<|endoftext|>"])}
    bad_json.write_text(json.dumps(small), encoding="utf-8")
    with pytest.raises(SunEdgeError, match="not a CLIP vocab"):
        CLIPTokenizer.from_files(bad_json, bad_merges)


def test_import_works_without_torch():
    code = textwrap.dedent(
        """
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, BlockTorch())
        from sun_edge.tokenizer import CLIPTokenizer
        ids = CLIPTokenizer.default().encode("a photo of a cat")
        assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407], ids
        blocked = [m for m in sys.modules if m == "torch" or m.startswith(("torch.", "transformers"))]
        assert not blocked, blocked
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _quiet_encode(tok: CLIPTokenizer, prompt: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return tok.encode(prompt)
