"""The mini-world's concept vocabulary: what objects exist and how they can look.

Category (shape) is what segmentation labels and referring expressions name; classification classes
are (colour, shape) pairs so both attributes matter; texture, size and background are nuisances for
classification but are described in captions and used to disambiguate referring expressions.
"""
from __future__ import annotations

SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond", "pentagon", "crescent"]
COLOURS = {  # name -> base RGB (jittered per object)
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "pink": (240, 125, 185), "cyan": (40, 200, 210),
}
COLOUR_NAMES = list(COLOURS)
TEXTURES = ["solid", "striped", "dotted", "checkered"]
SIZES = {"small": (0.07, 0.10), "medium": (0.13, 0.17), "large": (0.21, 0.27)}  # radius / min(H, W)
SIZE_NAMES = list(SIZES)
BACKGROUNDS = ["plain", "gradient", "noise", "grid"]

# words used in captions and expressions
TEXTURE_WORDS = {"solid": ["solid", "plain", "uniformly coloured"], "striped": ["striped", "stripy"],
                 "dotted": ["dotted", "polka-dot", "spotted"], "checkered": ["checkered", "chequered", "checked"]}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["medium-sized", "mid-sized"],
              "large": ["large", "big", "huge"]}
BACKGROUND_WORDS = {"plain": ["a plain", "a flat", "an empty"], "gradient": ["a gradient", "a fading"],
                    "noise": ["a noisy", "a grainy", "a mottled"], "grid": ["a grid", "a tiled"]}


def concept_id(shape: str, colour: str) -> int:
    """(shape, colour) concept id used in pool metadata: shape index * n_colours + colour index."""
    return SHAPES.index(shape) * len(COLOUR_NAMES) + COLOUR_NAMES.index(colour)


def concept_name(cid: int) -> str:
    shape, colour = divmod(cid, len(COLOUR_NAMES))
    return f"{COLOUR_NAMES[colour]} {SHAPES[shape]}"


def classification_classes(n_shapes: int, n_colours: int) -> list[tuple[str, str]]:
    """(colour, shape) classes: the first n_shapes shapes x first n_colours colours."""
    return [(c, s) for s in SHAPES[:n_shapes] for c in COLOUR_NAMES[:n_colours]]


def vocabulary() -> dict:
    return {"shapes": SHAPES, "colours": COLOUR_NAMES, "textures": TEXTURES, "sizes": SIZE_NAMES,
            "backgrounds": BACKGROUNDS,
            "concepts": {str(i): concept_name(i) for i in range(len(SHAPES) * len(COLOUR_NAMES))}}
