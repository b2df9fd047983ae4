"""A seeded synthetic visual question answering set: coloured shapes on a 3 x 3 grid, single-word answers.

Every image is a plain canvas (default 48 x 48 px) split into a 3 x 3 grid; 2-4 shapes (circle, square, triangle;
red, green, blue, yellow) sit in distinct cells with a little seeded jitter in size and position. No two shapes in
one scene share a (colour, shape) pair, so "the red circle" always names a single shape.

Question types (the answer always needs the image, and is one word of a closed vocabulary), in four categories:

- cell: what is at a named place.
  - `color_at`: "what color is the shape at the top left ?" -> a colour
  - `shape_at`: "what shape is at the middle center ?" -> a shape
- counting: the whole scene.
  - `count`: "how many shapes are there ?" -> a number word ("two")
  - `count_color`: "how many red shapes are there ?" -> a number word, "zero" included
  - `most_color`: "which color appears most ?" -> a colour; only asked when one colour has more shapes than every
    other (a tie has no answer, so a scene with one is never asked this)
- existence: `exists`: "is there a blue square ?" -> "yes" / "no"
- relation: where two shapes are with respect to each other. "left of" means in a column further left, whatever
  the row ("right of" likewise; "above" / "below": in a row further up / down, whatever the column).
  - `relation`: "what shape is left of the red circle ?" -> a shape; only asked when exactly one shape is there
  - `is_relation`: "is the red circle left of the blue square ?" -> "yes" / "no"; only asked when the two shapes
    are in different columns (rows for "above" / "below"), so "no" always means "on the other side"

To leave no text-only shortcut, the first question of every image is drawn *answer first*: a category uniformly,
a type of it uniformly, its arguments and the answer uniformly and independently, then a scene is built around
them. So, for example, "is there a blue square ?" is answered "yes" exactly as often as "no", and "how many red
shapes are there ?" zero to three times with equal probability. Further questions on the same image (multi-turn)
are picked from what the scene offers, choosing the answer uniformly among those available.

Text is lowercase, words are separated by single spaces and "?" is a separate word, so a word-level tokenizer built
from `vocabulary()` covers everything (the `<image>` placeholder is the processor's special token, not a word).

Records follow the LLaVA-InstructionMix-665K format; `image` is relative to the directory holding the JSON file::

    {"id": "train_000000", "image": "images/train/000000.png",
     "conversations": [{"from": "human", "value": "<image>\\nwhat shape is at the middle center ?"},
                       {"from": "gpt", "value": "circle"}]}
"""

import functools
import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

IMAGE_TOKEN = "<image>"
GRID_SIZE = 3
NUM_CELLS = GRID_SIZE * GRID_SIZE
BACKGROUND = (255, 255, 255)
# Saturated, well separated colours: a nearest-colour lookup on any pixel inside a shape is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
}
SHAPES = ("circle", "square", "triangle")
# Names of the 3 x 3 cells, row-major (cell index = row * 3 + column), as a word processor's alignment grid names
# them: always a row word, then a column word. With "top", "left", "center" instead of "top center", "middle left",
# "middle center", a model must infer the middle row or column from a word that is *not* there; the tiny from-scratch
# demo model (same seed and steps) found the colour at a position 79% of the time with these names, 63% without.
ROW_WORDS, COLUMN_WORDS = ("top", "middle", "bottom"), ("left", "center", "right")
POSITIONS = tuple(f"{row} {column}" for row in ROW_WORDS for column in COLUMN_WORDS)
# (row step, column step) from the referenced shape towards the side asked about.
RELATIONS: dict[str, tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# The four categories the demo reports, and the question types of each (see the module docstring).
QUESTION_CATEGORIES: dict[str, tuple[str, ...]] = {
    "cell": ("color_at", "shape_at"),
    "counting": ("count", "count_color", "most_color"),
    "existence": ("exists",),
    "relation": ("relation", "is_relation"),
}
QUESTION_TYPES = tuple(question_type for types in QUESTION_CATEGORIES.values() for question_type in types)
YES_NO = ("yes", "no")
# A scene holds at most 7 shapes: "what shape is left of the ... ?" needs a side of at least 3 cells holding exactly
# one shape, so two cells stay empty. So counts run from zero to seven.
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven")
MAX_SHAPES = len(NUMBER_WORDS) - 1
ANSWERS = (*COLORS, *SHAPES, *YES_NO, *NUMBER_WORDS)
# Bump when the drawing or the answering changes in a way the settings below do not show (it keys cached data).
GENERATOR_VERSION = 2

# Shape size as a fraction of the cell side, and the largest centre offset (fraction of the cell side). With these
# bounds every shape stays inside its own cell and covers the cell centre. Sizes vary by only +-5%, so a circle also
# covers clearly less area than a square (at 48 px: 112-148 vs 144-196 px): with sizes free over 0.55-0.8 their areas
# overlap and the tiny from-scratch demo model told circles from squares barely better than chance.
MIN_SCALE, MAX_SCALE = 0.72, 0.8
MAX_OFFSET = 0.06
MIN_IMAGE_SIZE = 12

_QUESTION_TEMPLATES = {
    "color_at": "what color is the shape at the {position} ?",
    "shape_at": "what shape is at the {position} ?",
    "count": "how many shapes are there ?",
    "count_color": "how many {color} shapes are there ?",
    "most_color": "which color appears most ?",
    "exists": "is there a {color} {shape} ?",
    "relation": "what shape is {relation} the {color} {shape} ?",
    "is_relation": "is the {color} {shape} {relation} the {other_color} {other_shape} ?",
}
# The arguments each question type takes (the others stay None).
_ARGUMENTS = {
    "color_at": ("cell",),
    "shape_at": ("cell",),
    "count": (),
    "count_color": ("color",),
    "most_color": (),
    "exists": ("color", "shape"),
    "relation": ("color", "shape", "relation"),
    "is_relation": ("color", "shape", "relation", "other_color", "other_shape"),
}
_ARGUMENT_VALUES = {
    "cell": range(NUM_CELLS),
    "color": COLORS,
    "shape": SHAPES,
    "relation": RELATIONS,
    "other_color": COLORS,
    "other_shape": SHAPES,
}
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def generator_settings() -> dict:
    """Everything besides the seed and the split sizes that fixes the generated data (for cache keys)."""
    return {
        "grid_size": GRID_SIZE,
        "positions": POSITIONS,
        "colors": COLORS,
        "shapes": SHAPES,
        "scale": [MIN_SCALE, MAX_SCALE],
        "max_offset": MAX_OFFSET,
        "background": BACKGROUND,
        "templates": _QUESTION_TEMPLATES,
        "categories": QUESTION_CATEGORIES,
        "numbers": NUMBER_WORDS,
        "version": GENERATOR_VERSION,
    }


@dataclass(frozen=True)
class Shape:
    """One shape of a scene.

    Args:
        color: one of `COLORS`.
        kind: one of `SHAPES`.
        cell: grid cell in `[0, 9)`, row-major (`POSITIONS[cell]` names it).
        scale: side (or diameter) as a fraction of the cell side, in `[MIN_SCALE, MAX_SCALE]`.
        dx, dy: offset of the shape centre from the cell centre, as a fraction of the cell side.
    """

    color: str
    kind: str
    cell: int
    scale: float = 0.76
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"Unknown colour {self.color!r}; expected one of {list(COLORS)}.")
        if self.kind not in SHAPES:
            raise ValueError(f"Unknown shape {self.kind!r}; expected one of {list(SHAPES)}.")
        if not 0 <= self.cell < NUM_CELLS:
            raise ValueError(f"Cell {self.cell} is outside the {GRID_SIZE} x {GRID_SIZE} grid [0, {NUM_CELLS}).")
        if not MIN_SCALE <= self.scale <= MAX_SCALE:
            raise ValueError(f"Shape scale {self.scale} is outside [{MIN_SCALE}, {MAX_SCALE}].")
        if max(abs(self.dx), abs(self.dy)) > MAX_OFFSET:
            raise ValueError(f"Shape offset ({self.dx}, {self.dy}) exceeds {MAX_OFFSET} of a cell.")

    @property
    def row(self) -> int:
        return self.cell // GRID_SIZE

    @property
    def column(self) -> int:
        return self.cell % GRID_SIZE


@dataclass(frozen=True)
class Scene:
    """Shapes in distinct cells, each (colour, shape) pair at most once, on a square canvas of `image_size` px."""

    shapes: tuple[Shape, ...]
    image_size: int = 48

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} px, got {self.image_size}.")
        if len(self.shapes) > MAX_SHAPES:
            raise ValueError(f"A scene holds at most {MAX_SHAPES} shapes, got {len(self.shapes)}.")
        cells = [shape.cell for shape in self.shapes]
        if len(set(cells)) != len(cells):
            raise ValueError(f"Two shapes share a cell: cells {cells}.")
        pairs = [(shape.color, shape.kind) for shape in self.shapes]
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"A (colour, shape) pair appears twice: {pairs}.")

    def shape_at(self, cell: int) -> Shape | None:
        """The shape in `cell`, or None when the cell is empty."""
        return next((shape for shape in self.shapes if shape.cell == cell), None)

    def find(self, color: str, kind: str) -> Shape | None:
        """The shape with this colour and kind, or None."""
        return next((shape for shape in self.shapes if (shape.color, shape.kind) == (color, kind)), None)

    def shapes_towards(self, cell: int, relation: str) -> list[Shape]:
        """The shapes on the `relation` side of `cell` (`cells_towards`)."""
        return [shape for shape in self.shapes if shape.cell in cells_towards(cell, relation)]

    def most_common_color(self) -> str | None:
        """The colour with more shapes than every other colour, or None when the most frequent colours tie."""
        counts = Counter(shape.color for shape in self.shapes).most_common()
        return counts[0][0] if len(counts) == 1 or counts[0][1] > counts[1][1] else None


@dataclass(frozen=True)
class QuestionSpec:
    """A question in structured form; `text` renders it.

    `type` is one of `QUESTION_TYPES` and takes the arguments `_ARGUMENTS[type]`, the others staying None: `cell`
    (`color_at`, `shape_at`), `color` (`count_color`; the shape asked about with `shape` in `exists`, `relation`,
    `is_relation`), `relation` (one of `RELATIONS`), and `other_color` / `other_shape` (the second shape of
    `is_relation`: "is the {color} {shape} {relation} the {other_color} {other_shape} ?").
    """

    type: str
    cell: int | None = None
    color: str | None = None
    shape: str | None = None
    relation: str | None = None
    other_color: str | None = None
    other_shape: str | None = None

    def __post_init__(self) -> None:
        if self.type not in QUESTION_TYPES:
            raise ValueError(f"Unknown question type {self.type!r}; expected one of {list(QUESTION_TYPES)}.")
        for argument, values in _ARGUMENT_VALUES.items():
            value = getattr(self, argument)
            if argument not in _ARGUMENTS[self.type]:
                if value is not None:
                    raise ValueError(f"Question type {self.type!r} takes no {argument}, got {value!r}.")
            elif value not in values:
                raise ValueError(f"Question type {self.type!r} needs a {argument} in {list(values)}, got {value!r}.")
        if self.type == "is_relation" and (self.color, self.shape) == (self.other_color, self.other_shape):
            raise ValueError(f"{self.text!r} compares a shape with itself.")

    @property
    def text(self) -> str:
        """The question as asked, e.g. "what shape is left of the red circle ?"."""
        position = POSITIONS[self.cell] if self.cell is not None else None
        return _QUESTION_TEMPLATES[self.type].format(
            position=position,
            color=self.color,
            shape=self.shape,
            relation=self.relation,
            other_color=self.other_color,
            other_shape=self.other_shape,
        )


def _template_pattern(template: str) -> re.Pattern:
    """`template` as a regex whose placeholders match exactly the words they can be filled with."""
    choices = {"position": POSITIONS, **_ARGUMENT_VALUES}
    del choices["cell"]  # rendered as its position
    pattern = re.escape(template)
    for placeholder, words in choices.items():
        pattern = pattern.replace(re.escape(f"{{{placeholder}}}"), "(?:" + "|".join(map(re.escape, words)) + ")")
    return re.compile(pattern)


_QUESTION_PATTERNS = {question_type: _template_pattern(t) for question_type, t in _QUESTION_TEMPLATES.items()}


def question_type_of(text: str) -> str:
    """The question type (one of `QUESTION_TYPES`) whose template produced `text`, e.g. for per-type accuracy."""
    for question_type, pattern in _QUESTION_PATTERNS.items():
        if pattern.fullmatch(text.strip()):
            return question_type
    raise ValueError(f"{text!r} is not a question of this data set (types {list(QUESTION_TYPES)}).")


def category_of(question_type: str) -> str:
    """The category (a key of `QUESTION_CATEGORIES`) a question type belongs to."""
    for category, types in QUESTION_CATEGORIES.items():
        if question_type in types:
            return category
    raise ValueError(f"Unknown question type {question_type!r}; expected one of {list(QUESTION_TYPES)}.")


def vocabulary() -> list[str]:
    """Every word that can appear in a question or an answer, sorted ("?" included; `<image>` is not)."""
    words = set(ANSWERS) | {"?"}
    for template in _QUESTION_TEMPLATES.values():
        words.update(word for word in template.split() if not word.startswith("{"))
    for phrase in (*POSITIONS, *RELATIONS):
        words.update(phrase.split())
    return sorted(words)


@functools.cache
def cells_towards(cell: int, relation: str) -> tuple[int, ...]:
    """Grid cells on the `relation` side of `cell`: every cell in a column further left ("left of"), whatever its
    row, and likewise for "right of", "above" (a row further up) and "below"."""
    row_step, column_step = RELATIONS[relation]
    row, column = divmod(cell, GRID_SIZE)
    return tuple(
        other
        for other in range(NUM_CELLS)
        if (other // GRID_SIZE - row) * row_step > 0 or (other % GRID_SIZE - column) * column_step > 0
    )


def _named_shape(scene: Scene, color: str, kind: str, spec: "QuestionSpec") -> Shape:
    shape = scene.find(color, kind)
    if shape is None:
        raise ValueError(f"There is no {color} {kind}: {spec.text!r} has no answer.")
    return shape


def answer(scene: Scene, spec: QuestionSpec) -> str:
    """The single correct answer to `spec` about `scene`.

    Raises:
        ValueError: if the question has no unique answer for this scene: an empty cell, a named shape that is not
            there, not exactly one shape on the asked side, two shapes in the same column (row) for a left / right
            (above / below) comparison, or a tie for the most frequent colour.
    """
    if spec.type in ("color_at", "shape_at"):
        shape = scene.shape_at(spec.cell)
        if shape is None:
            raise ValueError(f"No shape at the {POSITIONS[spec.cell]}: {spec.text!r} has no answer.")
        return shape.color if spec.type == "color_at" else shape.kind
    if spec.type == "count":
        return NUMBER_WORDS[len(scene.shapes)]
    if spec.type == "count_color":
        return NUMBER_WORDS[sum(shape.color == spec.color for shape in scene.shapes)]
    if spec.type == "most_color":
        color = scene.most_common_color()
        if color is None:
            raise ValueError(f"The most frequent colours tie: {spec.text!r} has no answer.")
        return color
    if spec.type == "exists":
        return "yes" if scene.find(spec.color, spec.shape) is not None else "no"
    reference = _named_shape(scene, spec.color, spec.shape, spec)
    if spec.type == "relation":
        targets = scene.shapes_towards(reference.cell, spec.relation)
        if len(targets) != 1:
            raise ValueError(
                f"{len(targets)} shapes are {spec.relation} the {spec.color} {spec.shape}; need exactly 1."
            )
        return targets[0].kind
    other = _named_shape(scene, spec.other_color, spec.other_shape, spec)
    if reference.cell in cells_towards(other.cell, spec.relation):
        return "yes"
    if reference.cell in cells_towards(other.cell, OPPOSITE[spec.relation]):
        return "no"
    axis = "column" if spec.relation in ("left of", "right of") else "row"
    raise ValueError(f"The two shapes of {spec.text!r} share a {axis}: neither is {spec.relation} the other.")


def draw_scene(scene: Scene) -> Image.Image:
    """Render `scene` as an RGB image of `scene.image_size` x `scene.image_size` px (no anti-aliasing)."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell_side = scene.image_size / GRID_SIZE
    for shape in scene.shapes:
        center_x = (shape.column + 0.5 + shape.dx) * cell_side
        center_y = (shape.row + 0.5 + shape.dy) * cell_side
        half = shape.scale * cell_side / 2
        box = (center_x - half, center_y - half, center_x + half, center_y + half)
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(box, fill=fill)
        else:  # An upward triangle: at the centre's height it is `half` wide, so it covers the cell centre.
            draw.polygon([(center_x, center_y - half), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image


def _jittered_shape(rng: random.Random, color: str, kind: str, cell: int) -> Shape:
    return Shape(
        color=color,
        kind=kind,
        cell=cell,
        scale=round(rng.uniform(MIN_SCALE, MAX_SCALE), 4),
        dx=round(rng.uniform(-MAX_OFFSET, MAX_OFFSET), 4),
        dy=round(rng.uniform(-MAX_OFFSET, MAX_OFFSET), 4),
    )


def _all_pairs() -> list[tuple[str, str]]:
    return [(color, kind) for color in COLORS for kind in SHAPES]


def _fill_scene(
    rng: random.Random,
    placed: list[tuple[str, str, int]],
    num_shapes: int,
    blocked_cells: Sequence[int] = (),
    blocked_pairs: Sequence[tuple[str, str]] = (),
    image_size: int = 48,
) -> Scene:
    """Add random shapes to the `placed` (colour, kind, cell) triples until there are `num_shapes`, then jitter all.

    New shapes avoid occupied and `blocked_cells`, and take (colour, kind) pairs not yet used nor in `blocked_pairs`.
    """
    used_cells = {cell for _, _, cell in placed} | set(blocked_cells)
    used_pairs = {(color, kind) for color, kind, _ in placed} | set(blocked_pairs)
    free_cells = [cell for cell in range(NUM_CELLS) if cell not in used_cells]
    free_pairs = [pair for pair in _all_pairs() if pair not in used_pairs]
    num_new = max(num_shapes - len(placed), 0)
    if num_new > min(len(free_cells), len(free_pairs)):
        raise ValueError(f"Cannot place {num_shapes} shapes: only {len(free_cells)} free cells remain.")
    new_cells = rng.sample(free_cells, num_new)
    new_pairs = rng.sample(free_pairs, num_new)
    triples = placed + [(color, kind, cell) for (color, kind), cell in zip(new_pairs, new_cells, strict=True)]
    shapes = tuple(_jittered_shape(rng, color, kind, cell) for color, kind, cell in triples)
    return Scene(shapes=tuple(sorted(shapes, key=lambda shape: shape.cell)), image_size=image_size)


def sample_scene(rng: random.Random, image_size: int = 48, min_shapes: int = 2, max_shapes: int = 4) -> Scene:
    """A random scene with `min_shapes`..`max_shapes` shapes (no question attached), e.g. for a demo image."""
    _check_shape_counts(min_shapes, max_shapes)
    return _fill_scene(rng, [], rng.randint(min_shapes, max_shapes), image_size=image_size)


def _check_shape_counts(min_shapes: int, max_shapes: int) -> None:
    if not 2 <= min_shapes <= max_shapes <= MAX_SHAPES:
        raise ValueError(
            f"Need 2 <= min_shapes <= max_shapes <= {MAX_SHAPES} (relations need two shapes, and a side of three "
            f"cells holding one of them), got min_shapes={min_shapes}, max_shapes={max_shapes}."
        )


def _pairs_of(color: str) -> list[tuple[str, str]]:
    return [(color, kind) for kind in SHAPES]


def _other_pairs(color: str) -> list[tuple[str, str]]:
    return [pair for pair in _all_pairs() if pair[0] != color]


def _at_random_cells(rng: random.Random, pairs: list[tuple[str, str]]) -> list[tuple[str, str, int]]:
    """(colour, kind, cell) triples: `pairs` placed in distinct random cells."""
    cells = rng.sample(range(NUM_CELLS), len(pairs))
    return [(color, kind, cell) for (color, kind), cell in zip(pairs, cells, strict=True)]


def sample_scene_and_question(
    rng: random.Random, question_type: str, min_shapes: int = 2, max_shapes: int = 4, image_size: int = 48
) -> tuple[Scene, QuestionSpec]:
    """Draw a question of `question_type` answer first (arguments and answer uniform), then a scene of
    `min_shapes`..`max_shapes` shapes around it."""
    _check_shape_counts(min_shapes, max_shapes)
    num_shapes = rng.randint(min_shapes, max_shapes)
    if question_type in ("color_at", "shape_at"):
        cell, (color, kind) = rng.randrange(NUM_CELLS), rng.choice(_all_pairs())
        scene = _fill_scene(rng, [(color, kind, cell)], num_shapes, image_size=image_size)
        return scene, QuestionSpec(question_type, cell=cell)
    if question_type == "count":  # the answer is `num_shapes`, uniform
        return _fill_scene(rng, [], num_shapes, image_size=image_size), QuestionSpec("count")
    if question_type == "count_color":
        color = rng.choice(list(COLORS))
        count = rng.randint(0, min(len(SHAPES), max_shapes))  # the answer first, then enough shapes for it
        num_shapes = rng.randint(max(min_shapes, count), max_shapes)
        placed = _at_random_cells(rng, rng.sample(_pairs_of(color), count))
        scene = _fill_scene(rng, placed, num_shapes, blocked_pairs=_pairs_of(color), image_size=image_size)
        return scene, QuestionSpec("count_color", color=color)
    if question_type == "most_color":
        color = rng.choice(list(COLORS))
        # The leading colour's count, such that the other shapes fit with fewer of each colour (2 shapes: both).
        leads = range(2, min(len(SHAPES), num_shapes) + 1)
        lead = rng.choice([lead for lead in leads if num_shapes - lead <= (len(COLORS) - 1) * (lead - 1)])
        while True:  # at most a few draws: most draws of the rest leave every other colour under `lead`
            rest = rng.sample(_other_pairs(color), num_shapes - lead)
            if all(count < lead for count in Counter(c for c, _ in rest).values()):
                break
        placed = _at_random_cells(rng, rng.sample(_pairs_of(color), lead) + rest)
        return _fill_scene(rng, placed, num_shapes, image_size=image_size), QuestionSpec("most_color")
    if question_type == "exists":
        color, kind = rng.choice(_all_pairs())
        if rng.choice(YES_NO) == "yes":
            placed = [(color, kind, rng.randrange(NUM_CELLS))]
            scene = _fill_scene(rng, placed, num_shapes, image_size=image_size)
        else:
            scene = _fill_scene(rng, [], num_shapes, blocked_pairs=[(color, kind)], image_size=image_size)
        return scene, QuestionSpec("exists", color=color, shape=kind)
    if question_type == "relation":
        relation = rng.choice(list(RELATIONS))
        # The side must hold exactly the target; the reference's own row or column takes the other shapes.
        references = [
            cell
            for cell in range(NUM_CELLS)
            if cells_towards(cell, relation) and NUM_CELLS - len(cells_towards(cell, relation)) + 1 >= num_shapes
        ]
        reference_cell = rng.choice(references)
        side_cells = cells_towards(reference_cell, relation)
        target_cell = rng.choice(side_cells)
        color, kind = rng.choice(_all_pairs())
        target_kind = rng.choice(SHAPES)
        target_color = rng.choice([c for c in COLORS if (c, target_kind) != (color, kind)])
        placed = [(color, kind, reference_cell), (target_color, target_kind, target_cell)]
        # Keep the rest of that side empty, so exactly one shape answers the question.
        scene = _fill_scene(rng, placed, num_shapes, blocked_cells=side_cells, image_size=image_size)
        return scene, QuestionSpec("relation", color=color, shape=kind, relation=relation)
    if question_type == "is_relation":
        relation = rng.choice(list(RELATIONS))
        side = relation if rng.choice(YES_NO) == "yes" else OPPOSITE[relation]
        other_cell = rng.choice([cell for cell in range(NUM_CELLS) if cells_towards(cell, side)])
        cell = rng.choice(cells_towards(other_cell, side))
        (color, kind), (other_color, other_kind) = rng.sample(_all_pairs(), 2)
        placed = [(color, kind, cell), (other_color, other_kind, other_cell)]
        scene = _fill_scene(rng, placed, num_shapes, image_size=image_size)
        spec = QuestionSpec(
            "is_relation", color=color, shape=kind, relation=relation, other_color=other_color, other_shape=other_kind
        )
        return scene, spec
    raise ValueError(f"Unknown question type {question_type!r}; expected one of {list(QUESTION_TYPES)}.")


def candidate_questions(scene: Scene, question_type: str) -> list[QuestionSpec]:
    """Every question of `question_type` with a unique answer for `scene`."""
    if question_type in ("color_at", "shape_at"):
        return [QuestionSpec(question_type, cell=shape.cell) for shape in scene.shapes]
    if question_type == "count":
        return [QuestionSpec("count")]
    if question_type == "count_color":
        return [QuestionSpec("count_color", color=color) for color in COLORS]
    if question_type == "most_color":
        return [QuestionSpec("most_color")] if scene.most_common_color() is not None else []
    if question_type == "exists":
        return [QuestionSpec("exists", color=color, shape=kind) for color, kind in _all_pairs()]
    if question_type == "relation":
        return [
            QuestionSpec("relation", color=shape.color, shape=shape.kind, relation=relation)
            for shape in scene.shapes
            for relation in RELATIONS
            if len(scene.shapes_towards(shape.cell, relation)) == 1
        ]
    if question_type == "is_relation":
        return [
            QuestionSpec(
                "is_relation",
                color=shape.color,
                shape=shape.kind,
                relation=relation,
                other_color=other.color,
                other_shape=other.kind,
            )
            for shape in scene.shapes
            for other in scene.shapes
            for relation in RELATIONS
            if shape.cell in cells_towards(other.cell, relation) + cells_towards(other.cell, OPPOSITE[relation])
        ]
    raise ValueError(f"Unknown question type {question_type!r}; expected one of {list(QUESTION_TYPES)}.")


def sample_question(
    rng: random.Random, scene: Scene, question_type: str, exclude: Sequence[QuestionSpec] = ()
) -> QuestionSpec | None:
    """A question about an existing scene: answer uniform among those the scene allows, then a matching question.

    Returns None when the scene allows no question of this type outside `exclude`.
    """
    return _pick_by_answer(rng, scene, candidate_questions(scene, question_type), exclude)


def _pick_by_answer(
    rng: random.Random, scene: Scene, candidates: Sequence[QuestionSpec], exclude: Sequence[QuestionSpec]
) -> QuestionSpec | None:
    by_answer: dict[str, list[QuestionSpec]] = {}
    for spec in candidates:
        if spec not in exclude:
            by_answer.setdefault(answer(scene, spec), []).append(spec)
    if not by_answer:
        return None
    chosen_answer = rng.choice(sorted(by_answer))
    return rng.choice(by_answer[chosen_answer])


def _choose_type(rng: random.Random, question_types: Sequence[str]) -> str:
    """A category uniformly among those `question_types` touch, then one of its types there uniformly."""
    categories = [types for types in QUESTION_CATEGORIES.values() if set(types) & set(question_types)]
    return rng.choice([question_type for question_type in rng.choice(categories) if question_type in question_types])


def sample_example(
    rng: random.Random,
    image_size: int = 48,
    questions_per_image: int = 1,
    min_shapes: int = 2,
    max_shapes: int = 4,
    question_types: Sequence[str] = QUESTION_TYPES,
) -> tuple[Scene, list[QuestionSpec]]:
    """One scene and `questions_per_image` distinct questions about it (the first drawn answer first).

    Each question's type is drawn by `_choose_type`: a category uniformly, then a type of it, so every category
    gets about the same share of the questions whatever its number of types.
    """
    _check_shape_counts(min_shapes, max_shapes)
    if not question_types or any(question_type not in QUESTION_TYPES for question_type in question_types):
        raise ValueError(f"question_types must be a non-empty subset of {list(QUESTION_TYPES)}, got {question_types}.")
    if questions_per_image < 1:
        raise ValueError(f"questions_per_image must be >= 1, got {questions_per_image}.")
    scene, first = sample_scene_and_question(
        rng, _choose_type(rng, question_types), min_shapes, max_shapes, image_size
    )
    specs = [first]
    candidates = {t: candidate_questions(scene, t) for t in question_types} if questions_per_image > 1 else {}
    while len(specs) < questions_per_image:
        options = [t for t in question_types if any(spec not in specs for spec in candidates[t])]
        if not options:
            raise ValueError(
                f"The scene allows fewer than {questions_per_image} distinct questions of {question_types}."
            )
        specs.append(_pick_by_answer(rng, scene, candidates[_choose_type(rng, options)], exclude=specs))
    return scene, specs


def to_record(record_id: str, image_path: str, scene: Scene, specs: Sequence[QuestionSpec]) -> dict:
    """A LLaVA-665K record: `<image>` opens the first human turn; one human/gpt pair per question."""
    conversations = []
    for turn, spec in enumerate(specs):
        question = f"{IMAGE_TOKEN}\n{spec.text}" if turn == 0 else spec.text
        conversations.append({"from": "human", "value": question})
        conversations.append({"from": "gpt", "value": answer(scene, spec)})
    return {"id": record_id, "image": image_path, "conversations": conversations}


def split_seed(seed: int, split: str) -> int:
    """A per-split seed derived from the base seed, so splits of one data set never share a random stream."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{split}".encode()).digest()[:8], "big")


def write_split(
    out_dir: str | Path,
    split: str,
    num_images: int,
    seed: int,
    image_size: int = 48,
    questions_per_image: int = 1,
    min_shapes: int = 2,
    max_shapes: int = 4,
    question_types: Sequence[str] = QUESTION_TYPES,
    progress: bool = True,
) -> Path:
    """Write `num_images` images to `out_dir/images/<split>/NNNNNN.png` and their records to `out_dir/<split>.json`.

    The stream is seeded by `split_seed(seed, split)`: the same arguments give byte-identical files.

    Returns:
        The path of the JSON file; its records' `image` paths are relative to `out_dir`.
    """
    if not _SPLIT_NAME.match(split):
        raise ValueError(f"Split name {split!r} must be letters, digits, '_' or '-' (it names a folder and a file).")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(split_seed(seed, split))
    records = []
    for index in tqdm(range(num_images), desc=f"synthetic {split}", disable=not progress):
        scene, specs = sample_example(rng, image_size, questions_per_image, min_shapes, max_shapes, question_types)
        image_path = f"images/{split}/{index:06d}.png"
        draw_scene(scene).save(out_dir / image_path, format="PNG")
        records.append(to_record(f"{split}_{index:06d}", image_path, scene, specs))
    json_path = out_dir / f"{split}.json"
    json_path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return json_path


def make_dataset(
    out_dir: str | Path, num_train: int, num_test: int, seed: int = 0, **split_kwargs
) -> tuple[Path, Path]:
    """Write a `train` and a held-out `test` split (separate random streams) under `out_dir`.

    `split_kwargs` go to `write_split` (image_size, questions_per_image, min_shapes, max_shapes, question_types,
    progress). Returns the paths of `train.json` and `test.json`.
    """
    train_json = write_split(out_dir, "train", num_train, seed, **split_kwargs)
    test_json = write_split(out_dir, "test", num_test, seed, **split_kwargs)
    return train_json, test_json
