"""Words for scenes: varied captions (retrieval, pool) and unambiguous referring expressions (refer).

Captions always name every object's colour and shape (so a caption identifies its image's content)
and add texture, size, background, count and spatial relations with varied wording.
Referring expressions are generated only when they single out their target among the scene's
objects: attributes first (shape, colour, size, texture), then position ("the leftmost star") and
relations to a uniquely named landmark ("the small red square left of the circle").
"""
from __future__ import annotations

import numpy as np

from .vocab import BACKGROUND_WORDS, SIZE_WORDS, TEXTURE_WORDS

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(obj: dict, rng: np.random.Generator, size=False, texture=False) -> str:
    words = []
    if size:
        words.append(_pick(rng, SIZE_WORDS[obj["size"]]))
    if texture:
        words.append(_pick(rng, TEXTURE_WORDS[obj["texture"]]))
    words += [obj["colour"], obj["shape"]]
    return " ".join(words)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def relation(a: dict, b: dict) -> str:
    """Dominant spatial relation of a relative to b (image coordinates: y grows downward)."""
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def region(obj: dict, width: int, height: int) -> str:
    col = ["left", "centre", "right"][min(2, int(3 * obj["cx"] / width))]
    row = ["top", "middle", "bottom"][min(2, int(3 * obj["cy"] / height))]
    if col == "centre" and row == "middle":
        return "the centre"
    if row == "middle":
        return f"the {col}"
    if col == "centre":
        return f"the {row}"
    return f"the {row} {col}"


def captions(scene: dict, rng: np.random.Generator, n: int = 5) -> list[str]:
    """`n` distinct captions of a scene (objects listed largest first)."""
    objs = sorted(scene["objects"], key=lambda o: -o["r"])
    bg = f"{_pick(rng, BACKGROUND_WORDS[scene['background']])} background"
    k = len(objs)
    many = f"{NUMBERS.get(k, str(k))} shapes" if k > 1 else "a single shape"
    w, h = scene["width"], scene["height"]
    plain = [_article(noun_phrase(o, rng)) for o in objs]
    rich = [_article(noun_phrase(o, rng, size=True, texture=True)) for o in objs]
    textured = [_article(noun_phrase(o, rng, texture=True)) for o in objs]
    sized = [_article(noun_phrase(o, rng, size=True)) for o in objs]
    pool = [
        f"{_join(rich)} on {bg}.",
        f"{_pick(rng, ['an image of', 'a picture of', 'a drawing of', 'a rendering of'])} {_join(plain)}.",
        f"{many}: {_join(textured)}.",
        f"there is {_join(sized)} in the image.",
        f"{_join(plain)} over {bg}.",
        f"{_pick(rng, ['a simple scene with', 'a synthetic image showing', 'a graphic containing'])} "
        f"{_join(textured)}.",
    ]
    if k >= 2:
        a, b = objs[0], objs[1]
        pool.append(f"{_article(noun_phrase(a, rng, texture=True))} {relation(a, b)} "
                    f"{_article(noun_phrase(b, rng))}" + (f", with {_join(plain[2:])}." if k > 2 else "."))
        pool.append(f"{_article(noun_phrase(b, rng, size=True))} {relation(b, a)} {_article(noun_phrase(a, rng))}"
                    + (f" and {_join(plain[2:])} nearby." if k > 2 else "."))
    else:
        pool.append(f"{rich[0]} in {region(objs[0], w, h)} of the image.")
        pool.append(f"a lone {noun_phrase(objs[0], rng, texture=True)} on {bg}.")
    order = rng.permutation(len(pool))
    out: list[str] = []
    for i in order:
        text = pool[int(i)]
        text = text[0].upper() + text[1:]
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------ referring expressions
ATTRIBUTE_SETS = [("shape",), ("colour", "shape"), ("size", "shape"), ("texture", "shape"),
                  ("size", "colour", "shape"), ("colour", "texture", "shape"), ("size", "colour", "texture", "shape")]


def _matches(o: dict, t: dict, attrs) -> bool:
    return all(o[a] == t[a] for a in attrs)


def _phrase(t: dict, attrs, rng) -> str:
    words = []
    if "size" in attrs:
        words.append(_pick(rng, SIZE_WORDS[t["size"]][:2]))
    if "colour" in attrs:
        words.append(t["colour"])
    if "texture" in attrs:
        words.append(_pick(rng, TEXTURE_WORDS[t["texture"]][:2]))
    words.append(t["shape"])
    return " ".join(words)


def referring_expressions(objs: list[dict], target: int, rng: np.random.Generator, width: int,
                          max_sentences: int = 3) -> list[str]:
    """Up to `max_sentences` expressions that each pick out objs[target] alone; [] if none exists."""
    t = objs[target]
    others = [o for i, o in enumerate(objs) if i != target]
    found: list[str] = []
    # 1. attributes alone
    for attrs in ATTRIBUTE_SETS:
        if not any(_matches(o, t, attrs) for o in others):
            found.append(_pick(rng, ["the {}", "{}", "the {} in the picture"]).format(_phrase(t, attrs, rng)))
            if len(found) >= 2:
                break
    # 2. extreme position among objects sharing its shape (and colour)
    for attrs in (("shape",), ("colour", "shape")):
        same = [o for o in objs if _matches(o, t, attrs)]
        if len(same) >= 2:
            xs = sorted(o["cx"] for o in same)
            margin = 0.05 * width
            if t["cx"] == xs[0] and xs[1] - xs[0] > margin:
                found.append(_pick(rng, ["the leftmost {}", "the {} on the left", "left {}"]).format(
                    _phrase(t, attrs, rng)))
                break
            if t["cx"] == xs[-1] and xs[-1] - xs[-2] > margin:
                found.append(_pick(rng, ["the rightmost {}", "the {} on the right", "right {}"]).format(
                    _phrase(t, attrs, rng)))
                break
    # 3. relation to a landmark named by its shape alone
    landmarks = [o for o in others if sum(p["shape"] == o["shape"] for p in objs) == 1 and o["shape"] != t["shape"]]
    for lm in landmarks:
        rel = relation(t, lm)
        for attrs in (("shape",), ("colour", "shape"), ("size", "colour", "shape")):
            rivals = [o for o in others if o is not lm and _matches(o, t, attrs) and relation(o, lm) == rel]
            if not rivals:
                found.append(f"the {_phrase(t, attrs, rng)} {rel} the {lm['shape']}")
                break
        if len(found) >= max_sentences + 1:
            break
    unique = list(dict.fromkeys(found))
    if len(unique) <= max_sentences:
        return unique
    keep = rng.choice(len(unique), size=max_sentences, replace=False)
    return [unique[int(i)] for i in sorted(keep)]
