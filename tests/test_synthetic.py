"""Tests of the synthetic VQA generator: determinism, answers re-derived from pixels, format, balance, vocabulary."""

import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adsc_llava.shapes_demo import synthetic

BACKGROUND = np.array([255, 255, 255])


def _read_grid(image: Image.Image) -> dict[tuple[int, int], tuple[str, str]]:
    """(row, column) -> (colour, shape) read from pixels only: colour at the cell centre, shape from its fill ratio."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    cell = pixels.shape[0] / 3
    grid = {}
    for row in range(3):
        for column in range(3):
            region = pixels[
                round(row * cell) : round((row + 1) * cell), round(column * cell) : round((column + 1) * cell)
            ]
            mask = (region != BACKGROUND).any(axis=-1)
            if not mask.any():
                continue
            center = pixels[int((row + 0.5) * cell), int((column + 0.5) * cell)]
            distances = {name: np.abs(center - np.array(rgb)).sum() for name, rgb in synthetic.COLORS.items()}
            color = min(distances, key=distances.get)
            assert distances[color] == 0, f"cell centre {center} is not a palette colour"
            # Every foreground pixel of the cell belongs to one shape of one colour.
            assert (region[mask] == np.array(synthetic.COLORS[color])).all()
            ys, xs = np.nonzero(mask)
            fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            # A box fills ~100% of its bounding box, a disc ~78%, an upward triangle ~50%.
            kind = "square" if fill > 0.95 else "circle" if fill > 0.63 else "triangle"
            grid[(row, column)] = (color, kind)
    return grid


def _position_to_cell(position: str) -> tuple[int, int]:
    words = position.split()
    row = 0 if "top" in words else 2 if "bottom" in words else 1
    column = 0 if "left" in words else 2 if "right" in words else 1
    return row, column


NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
SIDES = {"left of": (None, -1), "right of": (None, 1), "above": (-1, None), "below": (1, None)}


def _on_side(cell: tuple[int, int], of: tuple[int, int], relation: str) -> bool:
    """Whether `cell` is in a column further left than `of` ("left of"), whatever the row, and so on."""
    row_sign, column_sign = SIDES[relation]
    if row_sign is None:
        return (cell[1] - of[1]) * column_sign > 0
    return (cell[0] - of[0]) * row_sign > 0


def _answer_from_grid(grid: dict[tuple[int, int], tuple[str, str]], question: str) -> str:
    """Answer a question's text from a pixel-read grid, independently of the generator's own `answer`."""
    if match := re.fullmatch(r"what color is the shape at the (.+) \?", question):
        return grid[_position_to_cell(match[1])][0]
    if match := re.fullmatch(r"what shape is at the (.+) \?", question):
        return grid[_position_to_cell(match[1])][1]
    if question == "how many shapes are there ?":
        return NUMBERS[len(grid)]
    if match := re.fullmatch(r"how many (\w+) shapes are there \?", question):
        return NUMBERS[[color for color, _ in grid.values()].count(match[1])]
    if question == "which color appears most ?":
        (color, count), *rest = Counter(color for color, _ in grid.values()).most_common()
        assert not rest or rest[0][1] < count, f"{question!r}: a tie between the most frequent colours"
        return color
    if match := re.fullmatch(r"is there a (\w+) (\w+) \?", question):
        return "yes" if (match[1], match[2]) in grid.values() else "no"
    relations = "left of|right of|above|below"
    if match := re.fullmatch(rf"is the (\w+) (\w+) ({relations}) the (\w+) (\w+) \?", question):
        ((cell,),) = [[cell for cell, pair in grid.items() if pair == (match[1], match[2])]]
        ((other,),) = [[cell for cell, pair in grid.items() if pair == (match[4], match[5])]]
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[match[3]]
        assert _on_side(cell, other, match[3]) or _on_side(cell, other, opposite), f"{question!r}: same column/row"
        return "yes" if _on_side(cell, other, match[3]) else "no"
    match = re.fullmatch(rf"what shape is ({relations}) the (\w+) (\w+) \?", question)
    assert match, f"unparsable question {question!r}"
    ((reference,),) = [[cell for cell, pair in grid.items() if pair == (match[2], match[3])]]
    side = [kind for cell, (_, kind) in grid.items() if _on_side(cell, reference, match[1])]
    assert len(side) == 1, f"{question!r} has {len(side)} candidate answers"
    return side[0]


def _question_type(question: str) -> str:
    prefixes = {
        "what color": "color_at",
        "what shape is at": "shape_at",
        "how many shapes": "count",
        "how many": "count_color",
        "which color": "most_color",
        "is there": "exists",
        "what shape is": "relation",
        "is the": "is_relation",
    }
    return next(question_type for prefix, question_type in prefixes.items() if question.startswith(prefix))


def _question_answer_pairs(record: dict) -> list[tuple[str, str]]:
    turns = record["conversations"]
    questions = [turn["value"].removeprefix(synthetic.IMAGE_TOKEN + "\n") for turn in turns[::2]]
    return list(zip(questions, [turn["value"] for turn in turns[1::2]], strict=True))


def _sample_records(num_images: int, seed: int, **kwargs) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for index in range(num_images):
        scene, specs = synthetic.sample_example(rng, **kwargs)
        records.append(synthetic.to_record(str(index), f"{index}.png", scene, specs))
    return records


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }


def test_same_seed_gives_identical_bytes(tmp_path):
    for name in ("a", "b"):
        synthetic.write_split(tmp_path / name, "train", 40, seed=7, questions_per_image=2, progress=False)
    synthetic.write_split(tmp_path / "c", "train", 40, seed=8, questions_per_image=2, progress=False)
    first, second, other = (_files(tmp_path / name) for name in ("a", "b", "c"))
    assert len(first) == 41  # 40 images + the JSON file
    assert first == second
    assert first["train.json"] != other["train.json"]


def test_answers_agree_with_the_drawn_pixels(tmp_path):
    json_path = synthetic.write_split(
        tmp_path, "val", 400, seed=1, questions_per_image=3, max_shapes=6, progress=False
    )
    records = json.loads(json_path.read_text())
    seen_types = Counter()
    for record in records:
        grid = _read_grid(Image.open(tmp_path / record["image"]))
        assert 2 <= len(grid) <= 6
        for question, expected in _question_answer_pairs(record):
            assert _answer_from_grid(grid, question) == expected, (record["id"], question)
            seen_types[_question_type(question)] += 1
    assert set(seen_types) == set(synthetic.QUESTION_TYPES)


@pytest.mark.parametrize("image_size", [32, 64])
def test_other_image_sizes_are_drawn_readably(image_size):
    rng = random.Random(5)
    for _ in range(50):
        scene, specs = synthetic.sample_example(rng, image_size=image_size, max_shapes=6)
        image = synthetic.draw_scene(scene)
        assert image.size == (image_size, image_size)
        grid = _read_grid(image)
        assert grid == {divmod(shape.cell, 3): (shape.color, shape.kind) for shape in scene.shapes}
        assert _answer_from_grid(grid, specs[0].text) == synthetic.answer(scene, specs[0])


def test_records_follow_the_llava_665k_format(tmp_path):
    train_json, test_json = synthetic.make_dataset(tmp_path, 30, 20, seed=3, questions_per_image=2, progress=False)
    assert (train_json.name, test_json.name) == ("train.json", "test.json")
    for json_path, split, count in ((train_json, "train", 30), (test_json, "test", 20)):
        records = json.loads(json_path.read_text())
        assert len(records) == count
        assert len({record["id"] for record in records}) == count
        for record in records:
            assert set(record) == {"id", "image", "conversations"}
            assert record["image"].startswith(f"images/{split}/") and not Path(record["image"]).is_absolute()
            assert Image.open(json_path.parent / record["image"]).size == (48, 48)
            turns = record["conversations"]
            assert [turn["from"] for turn in turns] == ["human", "gpt", "human", "gpt"]
            assert all(set(turn) == {"from", "value"} for turn in turns)
            assert turns[0]["value"].startswith("<image>\n")
            assert sum(turn["value"].count("<image>") for turn in turns) == 1
            assert all(turn["value"] in synthetic.ANSWERS for turn in turns[1::2])
            assert turns[0]["value"] != "<image>\n" + turns[2]["value"]  # two distinct questions


def test_test_split_is_held_out(tmp_path):
    synthetic.make_dataset(tmp_path, 200, 100, seed=0, progress=False)
    train_images = {path.read_bytes() for path in (tmp_path / "images" / "train").iterdir()}
    test_images = {path.read_bytes() for path in (tmp_path / "images" / "test").iterdir()}
    assert len(train_images) == 200 and len(test_images) == 100
    assert not train_images & test_images


def test_yes_no_and_per_type_answers_are_balanced():
    answers_by_type = defaultdict(Counter)
    for record in _sample_records(8000, seed=11):
        ((question, given),) = _question_answer_pairs(record)
        answers_by_type[_question_type(question)][given] += 1
    yes_no = answers_by_type["exists"]
    assert set(yes_no) == {"yes", "no"}
    assert abs(yes_no["yes"] / yes_no.total() - 0.5) < 0.04
    expected = {
        "color_at": synthetic.COLORS,
        "shape_at": synthetic.SHAPES,
        "count": ["two", "three", "four"],
        "count_color": ["zero", "one", "two", "three"],
        "most_color": synthetic.COLORS,
        "exists": synthetic.YES_NO,
        "relation": synthetic.SHAPES,
        "is_relation": synthetic.YES_NO,
    }
    for question_type, counts in answers_by_type.items():
        assert set(counts) == set(expected[question_type])
        uniform = counts.total() / len(counts)
        assert all(abs(count - uniform) < 0.15 * uniform for count in counts.values()), (question_type, counts)
    # Each category asks about a quarter of the questions, whatever its number of types.
    per_category = Counter()
    for question_type, counts in answers_by_type.items():
        per_category[synthetic.category_of(question_type)] += counts.total()
    assert set(per_category) == {"cell", "counting", "existence", "relation"}
    assert all(abs(count / 8000 - 0.25) < 0.02 for count in per_category.values()), per_category


def test_text_alone_does_not_predict_the_answer():
    """The best text-only predictor (majority answer per exact question, fit on train) stays near chance."""
    answers_per_question = defaultdict(Counter)
    for record in _sample_records(4000, seed=21):
        for question, given in _question_answer_pairs(record):
            answers_per_question[question][given] += 1
    correct = total = 0
    chance = 0.0
    num_answers = {
        "color_at": 4,
        "shape_at": 3,
        "count": 3,
        "count_color": 4,
        "most_color": 4,
        "exists": 2,
        "relation": 3,
        "is_relation": 2,
    }
    for record in _sample_records(2000, seed=22):
        for question, given in _question_answer_pairs(record):
            guesses = answers_per_question.get(question)
            correct += bool(guesses) and guesses.most_common(1)[0][0] == given
            chance += 1 / num_answers[_question_type(question)]
            total += 1
    assert correct / total < chance / total + 0.05


def test_multi_turn_second_questions_have_valid_unique_answers():
    rng = random.Random(4)
    for _ in range(300):
        scene, specs = synthetic.sample_example(rng, questions_per_image=3, min_shapes=2, max_shapes=2)
        assert len(set(specs)) == 3
        grid = {divmod(shape.cell, 3): (shape.color, shape.kind) for shape in scene.shapes}
        assert all(_answer_from_grid(grid, spec.text) == synthetic.answer(scene, spec) for spec in specs)


def test_vocabulary_covers_exactly_the_words_used():
    vocabulary = synthetic.vocabulary()
    assert len(vocabulary) == len(set(vocabulary))
    assert all(word == word.lower() and " " not in word for word in vocabulary)
    used = set()
    # Up to 7 shapes, so every count from zero to seven is asked.
    for record in _sample_records(2000, seed=2, questions_per_image=2, max_shapes=7):
        for question, given in _question_answer_pairs(record):
            used.update(question.split())
            used.add(given)
    assert used == set(vocabulary)
    assert synthetic.IMAGE_TOKEN not in vocabulary


def test_every_position_name_is_a_row_word_then_a_column_word():
    # The demo's model reads a cell from two words; none has to be inferred from a word that is missing.
    assert len(set(synthetic.POSITIONS)) == synthetic.NUM_CELLS
    for cell, name in enumerate(synthetic.POSITIONS):
        row_word, column_word = name.split()
        assert synthetic.ROW_WORDS.index(row_word) == cell // synthetic.GRID_SIZE
        assert synthetic.COLUMN_WORDS.index(column_word) == cell % synthetic.GRID_SIZE


def test_answer_rejects_questions_without_a_unique_answer():
    row = synthetic.Scene(
        shapes=(
            synthetic.Shape("red", "circle", 0),
            synthetic.Shape("blue", "square", 1),
            synthetic.Shape("green", "triangle", 2),
        )
    )
    assert synthetic.answer(row, synthetic.QuestionSpec("relation", color="blue", shape="square", relation="left of"))
    with pytest.raises(ValueError, match="2 shapes are left of"):
        synthetic.answer(row, synthetic.QuestionSpec("relation", color="green", shape="triangle", relation="left of"))
    with pytest.raises(ValueError, match="No shape at the middle center"):
        synthetic.answer(row, synthetic.QuestionSpec("color_at", cell=4))
    with pytest.raises(ValueError, match="no yellow circle"):
        synthetic.answer(row, synthetic.QuestionSpec("relation", color="yellow", shape="circle", relation="above"))
    assert synthetic.answer(row, synthetic.QuestionSpec("exists", color="yellow", shape="circle")) == "no"


def test_bad_input_is_rejected_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="share a cell"):
        synthetic.Scene((synthetic.Shape("red", "circle", 0), synthetic.Shape("blue", "square", 0)))
    with pytest.raises(ValueError, match="appears twice"):
        synthetic.Scene((synthetic.Shape("red", "circle", 0), synthetic.Shape("red", "circle", 1)))
    with pytest.raises(ValueError, match="Unknown colour 'purple'"):
        synthetic.Shape("purple", "circle", 0)
    with pytest.raises(ValueError, match="Unknown question type"):
        synthetic.QuestionSpec("compare")
    with pytest.raises(ValueError, match="'count' takes no color"):
        synthetic.QuestionSpec("count", color="red")
    with pytest.raises(ValueError, match="'count_color' needs a color"):
        synthetic.QuestionSpec("count_color")
    with pytest.raises(ValueError, match="compares a shape with itself"):
        synthetic.QuestionSpec(
            "is_relation", color="red", shape="circle", relation="above", other_color="red", other_shape="circle"
        )
    eight = [synthetic.Shape(color, kind, cell) for cell, (color, kind) in enumerate(synthetic._all_pairs()[:8])]
    with pytest.raises(ValueError, match="at most 7 shapes"):
        synthetic.Scene(tuple(eight))
    with pytest.raises(ValueError, match="max_shapes <= 7"):
        synthetic.sample_example(random.Random(0), max_shapes=8)
    with pytest.raises(ValueError, match="min_shapes"):
        synthetic.sample_example(random.Random(0), min_shapes=1)
    with pytest.raises(ValueError, match="Split name"):
        synthetic.write_split(tmp_path, "../train", 1, seed=0)
    with pytest.raises(ValueError, match="num_images"):
        synthetic.write_split(tmp_path, "train", 0, seed=0)


def test_question_type_of_inverts_the_templates():
    rng = random.Random(0)
    for question_type in synthetic.QUESTION_TYPES:
        for _ in range(5):
            _, (spec,) = synthetic.sample_example(rng, question_types=[question_type])
            assert synthetic.question_type_of(spec.text) == question_type
    with pytest.raises(ValueError, match="not a question"):
        synthetic.question_type_of("how many circles are there ?")


def _scene(*shapes: tuple[str, str, int]) -> synthetic.Scene:
    return synthetic.Scene(tuple(synthetic.Shape(color, kind, cell) for color, kind, cell in shapes))


def _ask(scene: synthetic.Scene, question_type: str, **arguments) -> str:
    return synthetic.answer(scene, synthetic.QuestionSpec(question_type, **arguments))


def _is(scene: synthetic.Scene, first: tuple[str, str], relation: str, second: tuple[str, str]) -> str:
    """The answer to "is the <first> <relation> the <second> ?" about `scene`."""
    arguments = dict(color=first[0], shape=first[1], other_color=second[0], other_shape=second[1])
    return _ask(scene, "is_relation", relation=relation, **arguments)


def test_counting_answers_on_constructed_scenes():
    # red circle . blue square / . red triangle . / green circle . red square
    five = _scene(
        ("red", "circle", 0),
        ("blue", "square", 2),
        ("red", "triangle", 4),
        ("green", "circle", 6),
        ("red", "square", 8),
    )
    assert _ask(five, "count") == "five"
    counts = {color: _ask(five, "count_color", color=color) for color in synthetic.COLORS}
    assert counts == {"red": "three", "green": "one", "blue": "one", "yellow": "zero"}
    assert _ask(five, "most_color") == "red"
    assert _ask(five, "exists", color="red", shape="triangle") == "yes"
    assert _ask(five, "exists", color="blue", shape="circle") == "no"  # a blue shape and a circle, not a blue circle
    two_blue = _scene(("blue", "circle", 3), ("blue", "triangle", 5))
    assert (_ask(two_blue, "count"), _ask(two_blue, "most_color")) == ("two", "blue")
    assert _ask(two_blue, "count_color", color="blue") == "two"
    # Seven shapes in cells 0-6: red circle, square, triangle; green circle, square, triangle; blue circle.
    seven = _scene(*[(color, kind, cell) for cell, (color, kind) in enumerate(synthetic._all_pairs()[:7])])
    assert _ask(seven, "count") == "seven"
    assert [_ask(seven, "count_color", color=color) for color in synthetic.COLORS] == ["three", "three", "one", "zero"]
    with pytest.raises(ValueError, match="tie"):  # red and green, three each
        _ask(seven, "most_color")


def test_most_color_is_never_asked_on_a_tie():
    ties = [
        _scene(("red", "circle", 0), ("blue", "square", 8)),
        _scene(("red", "circle", 0), ("red", "square", 1), ("blue", "square", 7), ("blue", "circle", 8)),
        _scene(("red", "circle", 0), ("green", "square", 4), ("yellow", "triangle", 8)),
    ]
    for scene in ties:
        with pytest.raises(ValueError, match="tie"):
            _ask(scene, "most_color")
        assert synthetic.candidate_questions(scene, "most_color") == []
    untied = _scene(("red", "circle", 0), ("red", "square", 1), ("blue", "square", 7))
    assert synthetic.candidate_questions(untied, "most_color") == [synthetic.QuestionSpec("most_color")]


def test_relations_on_a_constructed_scene_whatever_the_row():
    # . yellow triangle . / blue circle . . / . . green square
    scene = _scene(("yellow", "triangle", 1), ("blue", "circle", 3), ("green", "square", 8))
    # "left of" means any column further left, whatever the row: the circle is one row lower.
    assert _ask(scene, "relation", color="yellow", shape="triangle", relation="left of") == "circle"
    assert _ask(scene, "relation", color="yellow", shape="triangle", relation="right of") == "square"
    assert _ask(scene, "relation", color="blue", shape="circle", relation="above") == "triangle"
    assert _ask(scene, "relation", color="blue", shape="circle", relation="below") == "square"
    with pytest.raises(ValueError, match="2 shapes are left of the green square"):
        _ask(scene, "relation", color="green", shape="square", relation="left of")
    with pytest.raises(ValueError, match="0 shapes are above the yellow triangle"):
        _ask(scene, "relation", color="yellow", shape="triangle", relation="above")
    texts = sorted(spec.text for spec in synthetic.candidate_questions(scene, "relation"))
    assert texts == [
        "what shape is above the blue circle ?",
        "what shape is below the blue circle ?",
        "what shape is left of the yellow triangle ?",
        "what shape is right of the yellow triangle ?",
    ]

    circle, triangle, square = ("blue", "circle"), ("yellow", "triangle"), ("green", "square")
    assert _is(scene, circle, "left of", square) == "yes" and _is(scene, square, "left of", circle) == "no"
    assert _is(scene, triangle, "left of", square) == "yes" and _is(scene, triangle, "right of", circle) == "yes"
    assert _is(scene, triangle, "above", circle) == "yes" and _is(scene, circle, "above", triangle) == "no"
    assert _is(scene, triangle, "below", square) == "no" and _is(scene, square, "below", circle) == "yes"
    # All three shapes differ in row and in column: every ordered pair and relation is a fair question.
    assert len(synthetic.candidate_questions(scene, "is_relation")) == 6 * 4


def test_comparisons_in_one_column_or_row_are_never_asked():
    scene = _scene(("red", "circle", 0), ("red", "square", 6), ("blue", "triangle", 7))  # circle above square
    circle, square, triangle = ("red", "circle"), ("red", "square"), ("blue", "triangle")
    with pytest.raises(ValueError, match="share a column"):
        _is(scene, circle, "left of", square)
    with pytest.raises(ValueError, match="share a row"):
        _is(scene, square, "below", triangle)
    assert _is(scene, circle, "above", square) == "yes"
    with pytest.raises(ValueError, match="no green circle"):
        _is(scene, ("green", "circle"), "above", square)
    asked = {spec.text for spec in synthetic.candidate_questions(scene, "is_relation")}
    assert "is the red circle left of the red square ?" not in asked
    assert "is the red circle above the red square ?" in asked
    assert "is the red square left of the blue triangle ?" in asked
    assert not any("square below the blue" in text or "triangle above the red square" in text for text in asked)
