"""Clean text and split it into sentences, for the local zero-shot tasks (``zeroshot.tasks``, used in
04-Benchmark).

The corpus's article leads were extracted from Wikipedia's HTML, which leaves traces: invisible characters
(word joiners U+2060, zero-width joiners, soft hyphens), a space before a comma or full stop where a
pronunciation or a symbol was dropped ("the astronomical symbol , representing"), "( " and "( CHEL-oh)".
``clean_text`` removes them; ``split_sentences`` then splits at sentence ends that a reader would see,
keeping abbreviations ("Dr.", "St."), initials ("J. R. R."), dotted acronyms ("U.S. Army") and decimals
("3.5") inside their sentence, but ending a sentence after a number ("… ranked 6. The …") and after "etc." or
"U.S." when a function word follows ("… and so on, etc. The …").
"""
from __future__ import annotations

import functools
import re
import unicodedata

MIN_SENTENCE_WORDS = 5  # shorter "sentences" are mostly list fragments

# Function words: final words a model could guess without reading the passage, and the words that open a
# sentence after an abbreviation that may end one ("… in the U.S. The …").
STOPWORDS = frozenset((
    "a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and", "any", "are", "as",
    "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could",
    "did", "do", "does", "doing", "down", "during", "each", "etc", "few", "for", "from", "further", "had", "has",
    "have", "having", "he", "her", "here", "hers", "herself", "him", "himself", "his", "how", "however", "i",
    "if", "in", "into", "is", "it", "its", "itself", "just", "more", "most", "my", "myself", "no", "nor", "not",
    "now", "of", "off", "on", "once", "one", "only", "or", "other", "our", "ours", "ourselves", "out", "over",
    "own", "same", "she", "should", "so", "some", "such", "than", "that", "the", "their", "theirs", "them",
    "themselves", "then", "there", "these", "they", "this", "those", "through", "thus", "to", "too", "two",
    "under", "until", "up", "upon", "us", "very", "was", "we", "were", "what", "when", "where", "which", "while",
    "who", "whom", "why", "will", "with", "within", "without", "would", "you", "your", "yours",
))
# First words that point back to something the sentence itself does not name.
PRONOUNS = frozenset((
    "he", "she", "it", "they", "him", "her", "them", "his", "its", "their", "this", "these", "those", "such",
    "both", "we",
))
# Words that open a sentence after an abbreviation that may end one.
_OPENERS = STOPWORDS | frozenset((
    "since", "although", "though", "many", "today", "later", "another", "every", "unlike", "despite", "among",
    "according", "following",
))
# Abbreviations that precede a name or a number, so never end a sentence (so does a lower-case letter and a
# full stop: "c. 1900", "b. 1950", "fl. 1300").
_NEVER_FINAL = frozenset((
    "mr", "mrs", "ms", "dr", "prof", "st", "mt", "ft", "gen", "col", "lt", "sgt", "capt", "rev", "hon", "no",
    "nos", "fig", "vs", "ca", "cf", "approx", "vol", "pp", "op", "e.g", "i.e", "lit", "fl", "sect", "subsp",
    "ssp", "var", "spp", "sp", "cv", "subg",
))
# Abbreviations that end a sentence only when one of the ``_OPENERS`` follows them.
_MAYBE_FINAL = frozenset(("etc", "inc", "ltd", "co", "corp", "bros", "jr", "sr", "al"))
_STOP = re.compile(r"[.!?][\"'”’)\]]*\s+")
_OPENING = "\"'“‘(["
_PUNCT_AFTER_SPACE = re.compile(r"\s+([,;:!?)\]]|\.(?=\s|$|[\"”)]))")  # "symbol , representing"
_STOP_WITHOUT_SPACE = re.compile(r"\s+\.(?=[A-Z][a-z])")                  # "festival days .The form"
_SPACE_AFTER_OPENING = re.compile(r"([(\[“])\s+")                        # "( CHEL-oh)"
_SPACE_BEFORE_CLOSING = re.compile(r"\s+”")
_EMPTY_BRACKETS = re.compile(r"\s*\(\s*[,;]?\s*\)|\s*\[\s*\]")             # what is left of a dropped IPA


def is_invisible(char: str) -> bool:
    """Whether a character prints nothing although it is not a plain space: format characters (U+200B–U+200D,
    U+2060, U+FEFF, the soft hyphen U+00AD, …), control characters and every whitespace but " "."""
    return char != " " and (char.isspace() or unicodedata.category(char).startswith("C"))


def clean_text(text: str) -> str:
    """``text`` without extraction artefacts: invisible characters dropped (whitespace ones become spaces),
    runs of whitespace collapsed, no space before , . ; : ! ? ) ] nor after ( [ “ nor inside a pair of "…",
    empty brackets dropped."""
    text = "".join(" " if char.isspace() else char for char in text if char.isspace() or not is_invisible(char))
    text = " ".join(text.split())
    parts = text.split('"')
    if len(parts) % 2:  # straight quotes pair up: every odd part is quoted
        text = '"'.join(part.strip() if i % 2 else part for i, part in enumerate(parts))
    text = _EMPTY_BRACKETS.sub("", text)
    text = _STOP_WITHOUT_SPACE.sub(". ", text)
    text = _PUNCT_AFTER_SPACE.sub(r"\1", text)
    text = _SPACE_AFTER_OPENING.sub(r"\1", text)
    return _SPACE_BEFORE_CLOSING.sub("”", text).strip()


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (whitespace collapsed): a break after . ! or ? followed by a capitalised word,
    unless the stop ends an abbreviation, an initial or a dotted acronym (see the module docstring)."""
    text = " ".join(text.split())
    sentences, start = [], 0
    for match in _STOP.finditer(text):
        if _ends_sentence(text[start : match.start() + 1], text[match.end() :]):
            sentences.append(text[start : match.end()].strip())
            start = match.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def _ends_sentence(before: str, after: str) -> bool:
    """Whether the stop ending ``before`` ends a sentence, given the text ``after`` the space that follows."""
    following = after.split(maxsplit=1)[0].lstrip(_OPENING)
    if not following[:1].isupper():
        return False
    if before.endswith(("!", "?")):
        return True
    word = before.split()[-1].lstrip(_OPENING)[:-1]  # the word the full stop ends, without the stop
    opener = following.rstrip(".,;:!?\"'”’)").lower()
    if word.lower() in _NEVER_FINAL or (len(word) == 1 and word.islower()):
        return False
    if len(word) == 1 and word.isalpha():  # an initial, unless a sentence plainly starts ("vitamin C. It …")
        return opener in _OPENERS and len(opener) > 1
    if word.lower() in _MAYBE_FINAL or "." in word:  # "etc.", "Inc.", "U.S.", "B.C."
        return opener in _OPENERS
    return True


def is_pronoun_led(sentence: str) -> bool:
    """Whether the sentence opens with a pronoun or a demonstrative ("He …", "Its …", "This …", "Such …"), so
    it needs an earlier sentence to make sense."""
    words = sentence.split(maxsplit=1)
    return bool(words) and re.split(r"['’,;:]", words[0].lstrip(_OPENING))[0].lower() in PRONOUNS  # "It's"


def brackets_balanced(text: str) -> bool:
    """Whether every ( [ “ in ``text`` is closed and straight double quotes come in pairs."""
    return (text.count("(") == text.count(")") and text.count("[") == text.count("]")
            and text.count("“") == text.count("”") and text.count('"') % 2 == 0)


@functools.lru_cache(maxsize=None)
def article_sentences(text: str) -> tuple[str, ...]:
    """The sentences of an article's cleaned text (cached: every task splits every test article)."""
    return tuple(split_sentences(clean_text(text)))


def n_words(text: str) -> int:
    return len(text.split())


def words(text: str) -> list[str]:
    """The lower-case words of ``text``: runs of letters (digits and punctuation split them)."""
    return re.findall(r"[^\W\d_]+", text.lower())
