"""A seeded synthetic visual question answering set: coloured shapes on a 3 x 3 grid, single-word answers.

Every image is a plain canvas (default 48 x 48 px) split into a 3 x 3 grid; 2-4 shapes (circle, square, triangle;
red, green, blue, yellow) sit in distinct cells with a little seeded jitter in size and position. No two shapes in
one scene share a (colour, shape) pair, so "the red circle" always names a single shape.

Question types (the answer always needs the image, and is one word of a closed vocabulary):

- `color_at`: "what color is the shape at the top left ?" -> a colour
- `shape_at`: "what shape is at the middle center ?" -> a shape
- `exists`: "is there a blue square ?" -> "yes" / "no"
- `relation`: "what shape is left of the red circle ?" -> a shape. "left of" means: in the same row, on the left;
  the question is only asked when exactly one shape is there (likewise "right of", "above", "below" in the column).

To leave no text-only shortcut, the first question of every image is drawn *answer first*: the type, its
arguments and the answer are sampled uniformly and independently, then a scene is built around them. So, for
example, "is there a blue square ?" is answered "yes" exactly as often as "no", and the shape left of the red circle
is a circle, square or triangle with equal probability. Further questions on the same image (multi-turn) are
picked from what the scene offers, choosing the answer uniformly among those available.

Text is lowercase, words are separated by single spaces and "?" is a separate word, so a word-level tokenizer built
from `vocabulary()` covers everything (the `<image>` placeholder is the processor's special token, not a word).

Records follow the LLaVA-InstructionMix-665K format; `image` is relative to the directory holding the JSON file::

    {"id": "train_000000", "image": "images/train/000000.png",
     "conversations": [{"from": "human", "value": "<image>\\nwhat shape is at the middle center ?"},
                       {"from": "gpt", "value": "circle"}]}
"""

import hashlib
import json
import random
import re
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
# (row step, column step) from the referenced shape towards the shape asked about.
RELATIONS: dict[str, tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
QUESTION_TYPES = ("color_at", "shape_at", "exists", "relation")
YES_NO = ("yes", "no")
ANSWERS = (*COLORS, *SHAPES, *YES_NO)

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
    "exists": "is there a {color} {shape} ?",
    "relation": "what shape is {relation} the {color} {shape} ?",
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


@dataclass(frozen=True)
class QuestionSpec:
    """A question in structured form; `text` renders it.

    `type` is one of `QUESTION_TYPES`; `cell` is used by `color_at` / `shape_at`, `color` and `shape` by `exists` and
    `relation` (the referenced shape), `relation` (one of `RELATIONS`) by `relation`.
    """

    type: str
    cell: int | None = None
    color: str | None = None
    shape: str | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.type not in QUESTION_TYPES:
            raise ValueError(f"Unknown question type {self.type!r}; expected one of {list(QUESTION_TYPES)}.")
        needs_cell = self.type in ("color_at", "shape_at")
        if needs_cell and (self.cell is None or not 0 <= self.cell < NUM_CELLS):
            raise ValueError(f"Question type {self.type!r} needs a cell in [0, {NUM_CELLS}), got {self.cell}.")
        if not needs_cell and (self.color not in COLORS or self.shape not in SHAPES):
            raise ValueError(
                f"Question type {self.type!r} needs a colour in {list(COLORS)} and a shape in {list(SHAPES)}, "
                f"got {self.color!r} and {self.shape!r}."
            )
        if self.type == "relation" and self.relation not in RELATIONS:
            raise ValueError(f"Relation {self.relation!r} is not one of {list(RELATIONS)}.")

    @property
    def text(self) -> str:
        """The question as asked, e.g. "what shape is left of the red circle ?"."""
        position = POSITIONS[self.cell] if self.cell is not None else None
        return _QUESTION_TEMPLATES[self.type].format(
            position=position, color=self.color, shape=self.shape, relation=self.relation
        )


def _template_pattern(template: str) -> re.Pattern:
    """`template` as a regex whose placeholders match exactly the words they can be filled with."""
    choices = {"position": POSITIONS, "color": COLORS, "shape": SHAPES, "relation": RELATIONS}
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


def vocabulary() -> list[str]:
    """Every word that can appear in a question or an answer, sorted ("?" included; `<image>` is not)."""
    words = set(ANSWERS) | {"?"}
    for template in _QUESTION_TEMPLATES.values():
        words.update(word for word in template.split() if not word.startswith("{"))
    for phrase in (*POSITIONS, *RELATIONS):
        words.update(phrase.split())
    return sorted(words)


def _cells_towards(cell: int, relation: str) -> list[int]:
    """Grid cells strictly on the `relation` side of `cell`, in the same row (left/right) or column (above/below)."""
    row_step, column_step = RELATIONS[relation]
    row, column = divmod(cell, GRID_SIZE)
    cells = []
    row, column = row + row_step, column + column_step
    while 0 <= row < GRID_SIZE and 0 <= column < GRID_SIZE:
        cells.append(row * GRID_SIZE + column)
        row, column = row + row_step, column + column_step
    return cells


def answer(scene: Scene, spec: QuestionSpec) -> str:
    """The single correct answer to `spec` about `scene`.

    Raises:
        ValueError: if the question has no unique answer for this scene (empty cell, unknown referenced shape, or not
            exactly one shape on the asked side of it).
    """
    if spec.type in ("color_at", "shape_at"):
        shape = scene.shape_at(spec.cell)
        if shape is None:
            raise ValueError(f"No shape at the {POSITIONS[spec.cell]}: {spec.text!r} has no answer.")
        return shape.color if spec.type == "color_at" else shape.kind
    reference = scene.find(spec.color, spec.shape)
    if spec.type == "exists":
        return "yes" if reference is not None else "no"
    if reference is None:
        raise ValueError(f"There is no {spec.color} {spec.shape}: {spec.text!r} has no answer.")
    targets = [scene.shape_at(cell) for cell in _cells_towards(reference.cell, spec.relation)]
    targets = [shape for shape in targets if shape is not None]
    if len(targets) != 1:
        raise ValueError(f"{len(targets)} shapes are {spec.relation} the {spec.color} {spec.shape}; need exactly 1.")
    return targets[0].kind


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
    if not 2 <= min_shapes <= max_shapes <= NUM_CELLS - 1:
        raise ValueError(
            f"Need 2 <= min_shapes <= max_shapes <= {NUM_CELLS - 1} (relations need two shapes and one free cell), "
            f"got min_shapes={min_shapes}, max_shapes={max_shapes}."
        )


def sample_scene_and_question(
    rng: random.Random, question_type: str, num_shapes: int, image_size: int = 48
) -> tuple[Scene, QuestionSpec]:
    """Draw a question of `question_type` answer first (arguments and answer uniform), then a scene around it."""
    if question_type in ("color_at", "shape_at"):
        cell, (color, kind) = rng.randrange(NUM_CELLS), rng.choice(_all_pairs())
        scene = _fill_scene(rng, [(color, kind, cell)], num_shapes, image_size=image_size)
        return scene, QuestionSpec(question_type, cell=cell)
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
        reference_cell = rng.choice([cell for cell in range(NUM_CELLS) if _cells_towards(cell, relation)])
        side_cells = _cells_towards(reference_cell, relation)
        target_cell = rng.choice(side_cells)
        color, kind = rng.choice(_all_pairs())
        target_kind = rng.choice(SHAPES)
        target_color = rng.choice([c for c in COLORS if (c, target_kind) != (color, kind)])
        placed = [(color, kind, reference_cell), (target_color, target_kind, target_cell)]
        # Keep the rest of that side empty, so exactly one shape answers the question.
        scene = _fill_scene(rng, placed, num_shapes, blocked_cells=side_cells, image_size=image_size)
        return scene, QuestionSpec("relation", color=color, shape=kind, relation=relation)
    raise ValueError(f"Unknown question type {question_type!r}; expected one of {list(QUESTION_TYPES)}.")


def candidate_questions(scene: Scene, question_type: str) -> list[QuestionSpec]:
    """Every question of `question_type` with a unique answer for `scene`."""
    if question_type in ("color_at", "shape_at"):
        return [QuestionSpec(question_type, cell=shape.cell) for shape in scene.shapes]
    if question_type == "exists":
        return [QuestionSpec("exists", color=color, shape=kind) for color, kind in _all_pairs()]
    if question_type == "relation":
        candidates = []
        for shape in scene.shapes:
            for relation in RELATIONS:
                side = [scene.shape_at(cell) for cell in _cells_towards(shape.cell, relation)]
                if sum(other is not None for other in side) == 1:
                    candidates.append(QuestionSpec("relation", color=shape.color, shape=shape.kind, relation=relation))
        return candidates
    raise ValueError(f"Unknown question type {question_type!r}; expected one of {list(QUESTION_TYPES)}.")


def sample_question(
    rng: random.Random, scene: Scene, question_type: str, exclude: Sequence[QuestionSpec] = ()
) -> QuestionSpec | None:
    """A question about an existing scene: answer uniform among those the scene allows, then a matching question.

    Returns None when the scene allows no question of this type outside `exclude`.
    """
    by_answer: dict[str, list[QuestionSpec]] = {}
    for spec in candidate_questions(scene, question_type):
        if spec not in exclude:
            by_answer.setdefault(answer(scene, spec), []).append(spec)
    if not by_answer:
        return None
    chosen_answer = rng.choice(sorted(by_answer))
    return rng.choice(by_answer[chosen_answer])


def sample_example(
    rng: random.Random,
    image_size: int = 48,
    questions_per_image: int = 1,
    min_shapes: int = 2,
    max_shapes: int = 4,
    question_types: Sequence[str] = QUESTION_TYPES,
) -> tuple[Scene, list[QuestionSpec]]:
    """One scene and `questions_per_image` distinct questions about it (the first drawn answer first)."""
    _check_shape_counts(min_shapes, max_shapes)
    if not question_types or any(question_type not in QUESTION_TYPES for question_type in question_types):
        raise ValueError(f"question_types must be a non-empty subset of {list(QUESTION_TYPES)}, got {question_types}.")
    if questions_per_image < 1:
        raise ValueError(f"questions_per_image must be >= 1, got {questions_per_image}.")
    scene, first = sample_scene_and_question(
        rng, rng.choice(question_types), rng.randint(min_shapes, max_shapes), image_size
    )
    specs = [first]
    while len(specs) < questions_per_image:
        options = [t for t in question_types if any(s not in specs for s in candidate_questions(scene, t))]
        if not options:
            raise ValueError(
                f"The scene allows fewer than {questions_per_image} distinct questions of {question_types}."
            )
        specs.append(sample_question(rng, scene, rng.choice(options), exclude=specs))
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
