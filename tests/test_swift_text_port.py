"""The Swift tokenizer's text cleanup, as an algorithm: a line-by-line Python transcription of
apps/macos/Sources/SUNEdgeKit/TextCleaner.swift, run on clip_text_tables.json, must equal sun-edge's
``clean_text`` and tokenizer.

No Swift compiler runs here, so this checks the port's design (its reading of ftfy, html.unescape,
str.lower, str.split and the tokenizer regex), not the Swift code's syntax or semantics; the Swift
package's own tests check the Swift code against tokens.json on a Mac.
"""

from __future__ import annotations

import json
import random
import unicodedata
import warnings
from pathlib import Path

import pytest

from sun_edge.tokenizer import CLIPTokenizer, clean_text

REPO = Path(__file__).resolve().parent.parent
TABLES = REPO / "apps" / "macos" / "Sources" / "SUNEdgeKit" / "Resources" / "clip_text_tables.json"
SPECIALS = ("<|startoftext|>", "<|endoftext|>")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


class Ranges:
    def __init__(self, pairs: list[list[int]]) -> None:
        self.pairs = pairs

    def __contains__(self, value: int) -> bool:
        lo, hi = 0, len(self.pairs) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            a, b = self.pairs[mid]
            if value < a:
                hi = mid - 1
            elif value > b:
                lo = mid + 1
            else:
                return True
        return False


class SwiftCleaner:
    """TextCleaner.swift, transcribed (same names, same control flow; strings as lists of characters)."""

    def __init__(self, t: dict) -> None:
        self.t = t
        self.python_space, self.regex_space = Ranges(t["python_space"]), Ranges(t["regex_space"])
        self.letters, self.numbers = Ranges(t["regex_letters"]), Ranges(t["regex_numbers"])
        self.w1252 = t["sloppy_windows_1252"]
        self.w1252_encoder = {ord(c): b for b, c in enumerate(self.w1252)}
        self.ligatures = {int(k): v for k, v in t["ligatures"].items()}
        self.width = {int(k): v for k, v in t["width_map"].items()}
        self.control = set(t["control_chars"])
        self.lower = {int(k): v for k, v in t["lowercase"].items()}
        self.charrefs = {int(k): v for k, v in t["html_invalid_charrefs"].items()}
        self.invalid_codepoints = set(t["html_invalid_codepoints"])

    def clean(self, text: str) -> str:
        s = self.html_unescape(self.html_unescape(self.fix_text(text)))
        words, current = [], ""
        for ch in s:
            if ord(ch) in self.python_space:
                if current:
                    words.append(current)
                    current = ""
            else:
                current += ch
        if current:
            words.append(current)
        return self.lowercased(" ".join(words))

    def split(self, text: str) -> list[str]:
        words, i = [], 0
        while i < len(text):
            literal = next((p for p in SPECIALS + CONTRACTIONS if text.startswith(p, i)), None)
            if literal:
                words.append(literal)
                i += len(literal)
                continue
            v = ord(text[i])
            if v in self.letters:
                j = i + 1
                while j < len(text) and ord(text[j]) in self.letters:
                    j += 1
                words.append(text[i:j])
                i = j
            elif v in self.numbers:
                words.append(text[i])
                i += 1
            elif v not in self.regex_space:
                j = i + 1
                while j < len(text) and self.is_other(ord(text[j])):
                    j += 1
                words.append(text[i:j])
                i = j
            else:
                i += 1
        return words

    def is_other(self, v: int) -> bool:
        return v not in self.regex_space and v not in self.letters and v not in self.numbers

    def fix_text(self, text: str) -> str:
        out, unescape, start = "", True, 0
        while start < len(text):
            end = start
            while end < len(text) and text[end] != "\n":
                end += 1
            end = min(end + 1, len(text))
            segment = text[start:end]
            if unescape and "<" in segment:
                unescape = False
            out += self.fix_segment(segment, unescape)
            start = end
        return out

    def fix_segment(self, text: str, unescape_html: bool) -> str:
        while True:
            original = text
            if unescape_html:
                text = self.ftfy_unescape(text)
            text = self.fix_encoding(text)
            text = "".join(self.w1252[ord(c)] if 0x80 <= ord(c) <= 0x9F else c for c in text)
            text = "".join(self.ligatures.get(ord(c), c) for c in text)
            text = "".join(self.width.get(ord(c), c) for c in text)
            text = "".join('"' if 0x201C <= ord(c) <= 0x201F else "'" if ord(c) == 0x02BC or 0x2018 <= ord(c) <= 0x201B
                           else c for c in text)
            text = self.fix_line_breaks(text)
            text = self.remove_terminal_escapes(text)
            text = "".join(c for c in text if ord(c) not in self.control)
            text = unicodedata.normalize("NFC", text)
            if text == original:
                return text

    def fix_encoding(self, text: str) -> str:
        while not text.isascii():
            fixed = None
            for encode in (self.latin1_bytes, self.w1252_bytes):
                data = encode(text)
                if data is not None:
                    try:
                        fixed = data.decode("utf-8")
                        break
                    except UnicodeDecodeError:
                        pass
            if fixed is None or fixed == text:
                break
            text = fixed
        return text

    def latin1_bytes(self, text: str) -> bytes | None:
        return bytes(ord(c) for c in text) if all(ord(c) <= 0xFF for c in text) else None

    def w1252_bytes(self, text: str) -> bytes | None:
        try:
            return bytes(self.w1252_encoder[ord(c)] for c in text)
        except KeyError:
            return None

    def fix_line_breaks(self, text: str) -> str:
        out, i = "", 0
        while i < len(text):
            v = ord(text[i])
            if v == 0x0D:
                out += "\n"
                if i + 1 < len(text) and text[i + 1] == "\n":
                    i += 1
            elif v in (0x2028, 0x2029, 0x85):
                out += "\n"
            else:
                out += text[i]
            i += 1
        return out

    def remove_terminal_escapes(self, text: str) -> str:
        out, i = "", 0
        while i < len(text):
            if text[i] == "\x1b" and i + 1 < len(text) and text[i + 1] == "[":
                j = i + 2
                while j < len(text) and (text[j] == ";" or unicodedata.category(text[j]) == "Nd"):
                    j += 1
                if j < len(text) and text[j].isascii() and text[j].isalpha():
                    i = j + 1
                    continue
            out += text[i]
            i += 1
        return out

    def ftfy_unescape(self, text: str) -> str:
        out, i = "", 0
        while i < len(text):
            if text[i] != "&":
                out += text[i]
                i += 1
                continue
            j = i + 1
            if j < len(text) and text[j] == "#":
                j += 1
            run_start = j
            while j < len(text) and j - run_start < 25 and text[j].isascii() and text[j].isalnum():
                j += 1
            run = j - run_start
            if not (1 <= run <= 24 and j < len(text) and text[j] == ";"):
                out += text[i]
                i += 1
                continue
            match = text[i:j + 1]
            if match in self.t["ftfy_entities"]:
                out += self.t["ftfy_entities"][match]
            elif len(match) > 1 and match[1] == "#":
                unescaped = self.html_unescape(match)
                out += match if ";" in unescaped else unescaped
            else:
                out += match
            i = j + 1
        return out

    def html_unescape(self, text: str) -> str:
        if "&" not in text:
            return text
        out, i = "", 0
        while i < len(text):
            if text[i] != "&" or i + 1 >= len(text):
                out += text[i]
                i += 1
                continue
            j = i + 1
            if text[j] == "#":
                k = j + 1
                hexa = k < len(text) and text[k] in "xX"
                if hexa:
                    k += 1
                digits_start = k
                while k < len(text) and (text[k] in "0123456789abcdefABCDEF" if hexa else text[k] in "0123456789"):
                    k += 1
                if k == digits_start:
                    out += text[i]
                    i += 1
                    continue
                digits = text[digits_start:k]
                if k < len(text) and text[k] == ";":
                    k += 1
                out += self.numeric(digits, 16 if hexa else 10)
                i = k
                continue
            while j < len(text) and j - (i + 1) < 32 and text[j] not in " \t\n\x0c<&#;":
                j += 1
            if j == i + 1:
                out += text[i]
                i += 1
                continue
            if j < len(text) and text[j] == ";":
                j += 1
            out += self.named(text[i + 1:j])
            i = j
        return out

    def numeric(self, digits: str, radix: int) -> str:
        trimmed = digits.lstrip("0")
        value = None if len(trimmed) > 8 else int(trimmed or "0", radix)
        if value is None or value > 0x10FFFF:
            return "\ufffd"
        if value in self.charrefs:
            return self.charrefs[value]
        if 0xD800 <= value <= 0xDFFF:
            return "\ufffd"
        if value in self.invalid_codepoints:
            return ""
        return chr(value)

    def named(self, name: str) -> str:
        html5 = self.t["html5"]
        if name in html5:
            return html5[name]
        length = len(name) - 1
        while length > 1:
            if name[:length] in html5:
                return html5[name[:length]] + name[length:]
            length -= 1
        return "&" + name

    def lowercased(self, text: str) -> str:
        out = []
        for i, ch in enumerate(text):
            if ord(ch) == 0x03A3:
                out.append("\u03c2" if self.final_sigma(text, i) else "\u03c3")
            else:
                out.append(self.lower.get(ord(ch), ch))
        return "".join(out)

    def final_sigma(self, text: str, index: int) -> bool:
        # Swift uses Unicode.Scalar.Properties.isCased / isCaseIgnorable; CPython's own tests are the model here.
        j = index - 1
        while j >= 0 and _case_ignorable(text[j]):
            j -= 1
        if j < 0 or not _cased(text[j]):
            return False
        k = index + 1
        while k < len(text) and _case_ignorable(text[k]):
            k += 1
        return k == len(text) or not _cased(text[k])


def _cased(ch: str) -> bool:
    return ch.lower() != ch or ch.upper() != ch or unicodedata.category(ch) in ("Lt",)


def _case_ignorable(ch: str) -> bool:
    return unicodedata.category(ch) in ("Mn", "Me", "Cf", "Lm", "Sk") or ch in "'.:^`\u00ad\u00b7\u2018\u2019\u2024\u2027"


@pytest.fixture(scope="module")
def cleaner() -> SwiftCleaner:
    return SwiftCleaner(json.loads(TABLES.read_text(encoding="utf-8")))


def _prompts() -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_make_swift_vectors", REPO / "scripts" / "make_swift_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PROMPTS


def _fuzz(n: int = 400) -> list[str]:
    """Random prompts from pieces that exercise each fix (seeded). Latin-1 letters are left out: next to each
    other they can look like mojibake, which ftfy's heuristics judge and the Swift port does not (see below)."""
    pieces = ["a", "Cat", " ", "  ", "\t", "\n", ",", "!!", "'s", "'ll", "''", "&amp;", "&AMP;", "&#39;", "&#x27",
              "&notit;", "&ampx", "&#", "&", "<", "e\u0301", "ﬁ", "Ａ", "\u3000", "\u201c", "\u2019", "\x1b[1m",
              "\x07", "\r\n", "\u2028", "ΟΣ", "Σ", "İ", "猫", "🐶", "٣", "<|endoftext|>", "\u200b", "\ufeff",
              "\xa0", "42", "x", "Ǆ", "ĳ", "Ω"]
    rng = random.Random(0)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def test_the_swift_cleanup_equals_clean_text_on_the_vector_prompts(cleaner):
    for prompt in _prompts():
        assert cleaner.clean(prompt) == clean_text(prompt), repr(prompt)


def test_the_swift_split_and_bpe_input_equal_the_tokenizer(cleaner):
    tok = CLIPTokenizer.default()
    for prompt in _prompts():
        words = cleaner.split(cleaner.clean(prompt))
        assert words == tok._pattern.findall(clean_text(prompt)), repr(prompt)


def test_the_swift_cleanup_on_random_prompts(cleaner):
    for prompt in _fuzz():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = clean_text(prompt)
        assert cleaner.clean(prompt) == want, repr(prompt)


@pytest.mark.parametrize(("prompt", "ftfy_gives"), [
    ("\x07Σ,Ã©", "σ,é"),  # mojibake inside text that is not all Windows-1252: ftfy repairs the part
    ("ß½é", "᫂"),  # Latin-1 letters ftfy's badness score takes for mojibake
])
def test_known_differences_from_ftfy(cleaner, prompt, ftfy_gives):
    """The port repairs whole-line mojibake only (README, "macOS apps"); these prompts tokenize differently."""
    assert clean_text(prompt) == ftfy_gives
    assert cleaner.clean(prompt) != ftfy_gives
