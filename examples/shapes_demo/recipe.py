"""What one demo run trains and on what: the recipe (`FULL`, and `QUICK` for the smoke test) and its cache key."""

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from adsc_llava.shapes_demo import synthetic

# Questions the demo asks: every type of the generator, about a quarter of them in each category (what is at a
# named place; counting; existence; relations between two shapes), training and test alike.
QUESTION_TYPES = synthetic.QUESTION_TYPES
BUDGET_FRACTIONS = (1 / 3, 2 / 9, 1 / 9)  # the paper's 192, 128 and 64 of 576
# Seeds of the test split and of the fine-tuning runs; the spread of a table cell is its min-max over them.
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0, 1)


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes and hyper-parameters of one demo run (the full run and `--quick` differ only here)."""

    num_train_images: int
    num_test_images: int
    questions_per_image: int
    base_steps: int
    base_learning_rate: float
    lora_steps: int
    lora_learning_rate: float
    projector_learning_rate: float
    batch_size: int = 16
    base_batch_size: int = 32
    lora_rank: int = 32
    image_size: int = 48
    patch_size: int = 4  # 48 / 4 = 12 x 12 = 144 vision tokens per image
    text_hidden: int = 64
    text_layers: int = 12  # the reverse curriculum's 0.8 x (1/9) budget needs the first pruning layer at 1/12
    text_heads: int = 4
    # From scratch, the LM must learn to match the cell named in the question with the position of vision tokens
    # up to ~200 positions back. With Llama's RoPE base 10,000 most channels of a 16-wide head rotate too fast over
    # that span for such content matching; a base of 1e6 (as in recent Llama/Qwen models) leaves it more of them.
    rope_theta: float = 1e6
    # The CLIP tower starts with 2-D sin-cos patch position embeddings (a pretrained CLIP already knows its grid).
    position_init_scale: float = 0.3
    # Llama's init std of 0.02 suits 4096-wide layers; at width 64 it leaves the attention logits near zero (uniform
    # attention) for hundreds of steps. 0.1 (about 1 / sqrt(64)) learns where things are sooner.
    text_initializer_range: float = 0.1
    vision_hidden: int = 64
    vision_layers: int = 2
    # The projector reads the tower's last layer: a shallow from-scratch tower has no layer to spare (LLaVA-1.5
    # reads the second-to-last of CLIP-L's 24).
    vision_feature_layer: int = -1
    # Scenes hold 2-4 shapes (train and test alike): with always 2, "attend to both coloured shapes" already answers
    # half the questions, and that shortcut held up learning *where* things are (measured in the README).
    min_shapes: int = 2
    max_shapes: int = 4
    # Seed of the training data and of the base model's initialisation and order (the fine-tuning runs and the test
    # splits take the run's seeds, `SEEDS`).
    seed: int = 0


FULL = DemoRecipe(
    num_train_images=40000,
    num_test_images=1000,
    questions_per_image=4,
    base_steps=1800,
    base_learning_rate=1e-3,
    lora_steps=120,
    lora_learning_rate=1e-3,
    projector_learning_rate=3e-4,
)
QUICK = replace(
    FULL,
    num_train_images=64,
    num_test_images=32,
    questions_per_image=4,
    base_steps=6,
    lora_steps=3,
    batch_size=8,
    base_batch_size=8,
)


def recipe_key(recipe: DemoRecipe) -> str:
    """A short hash naming the cached data and base model of a recipe (rerunning the same recipe reuses them).

    The data generator's settings are part of it, so changing how scenes are drawn never reuses stale data.
    """
    identity = {"recipe": asdict(recipe), "generator": synthetic.generator_settings()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
