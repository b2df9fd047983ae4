"""Curricula over the vision-token budget (paper III-C, Table III).

A curriculum is a list of phases, each training at `factor x target budget`. Every phase keeps the pruning layers
and solves its own drop ratio `r` for its budget with `solve_drop_ratio`, so "0.8x" means 80% of the target's
average vision tokens per layer, not 80% of its `r`. The phase is a pure function of the global step, so a run
resumed from any checkpoint continues in the right phase.
"""

from dataclasses import dataclass

from transformers import TrainerCallback

from adsc_llava import AdscLlavaConfig
from adsc_llava.configuration_adsc_llava import reachable_budget_range, vision_tokens_per_layer
from adsc_llava.cost import format_schedule

CURRICULUM_FACTORS = {
    "reverse": (0.8, 0.9, 1.0),  # the paper's default: hardest first, then relax to the target
    "standard": (1.2, 1.1, 1.0),
    "direct": (1.0,),
}


@dataclass(frozen=True)
class CurriculumPhase:
    """Optimizer steps `[first_step, end_step)` (0-based) train at `budget` tokens, i.e. drop ratio `drop_ratio`."""

    first_step: int
    end_step: int
    factor: float
    budget: float
    drop_ratio: float


def build_curriculum(
    config: AdscLlavaConfig,
    target_budget: float,
    total_steps: int,
    factors: tuple[float, ...] = CURRICULUM_FACTORS["reverse"],
    phase_fractions: tuple[float, ...] | None = None,
) -> list[CurriculumPhase]:
    """Split `total_steps` into phases training at `factor * target_budget` vision tokens on average.

    Args:
        config: the model's config; its pruning layers and `reference_vision_tokens` are used.
        target_budget: the final average vision tokens per layer (e.g. 192 of 576).
        total_steps: optimizer steps of the whole run.
        factors: budget factors of the phases, in order.
        phase_fractions: share of the steps of each phase (default: equal); must sum to 1.
    """
    if not factors:
        raise ValueError("A curriculum needs at least one phase factor.")
    phase_fractions = phase_fractions or tuple(1 / len(factors) for _ in factors)
    if len(phase_fractions) != len(factors) or abs(sum(phase_fractions) - 1) > 1e-6 or min(phase_fractions) < 0:
        raise ValueError(
            f"phase_fractions {phase_fractions} must be one non-negative share per factor {factors}, summing to 1."
        )
    if total_steps < len(factors):
        raise ValueError(
            f"A {len(factors)}-phase curriculum needs at least {len(factors)} optimizer steps, "
            f"the run has {total_steps}."
        )
    num_layers = config.text_config.num_hidden_layers
    num_tokens = config.reference_vision_tokens
    low, high = reachable_budget_range(num_layers, config.adsc_pruning_layers, num_tokens)
    phases, first_step, cumulative = [], 0, 0.0
    for factor, fraction in zip(factors, phase_fractions, strict=True):
        budget = factor * target_budget
        if not low <= budget <= high:
            raise ValueError(
                f"Curriculum phase {factor}x of budget {target_budget} = {budget:g} tokens is outside the range "
                f"[{low:g}, {high:g}] that pruning layers {config.adsc_pruning_layers} reach."
            )
        cumulative += fraction
        end_step = round(cumulative * total_steps)
        drop_ratio = config.with_budget(budget).adsc_drop_ratio
        phases.append(CurriculumPhase(first_step, end_step, factor, budget, drop_ratio))
        first_step = end_step
    return phases


def phase_at(phases: list[CurriculumPhase], step: int) -> CurriculumPhase:
    """The phase that optimizer step `step` (0-based) trains in; steps past the end stay in the last phase."""
    for phase in phases:
        if step < phase.end_step:
            return phase
    return phases[-1]


class CurriculumCallback(TrainerCallback):
    """Runs a curriculum on the model's config: its phases are built when training starts, for the Trainer's own
    step count (`state.max_steps`), and the drop ratio is set from the global step before every optimizer step (and
    at a resumed start).

    Args:
        config: the model's config, whose `adsc_drop_ratio` is moved.
        target_budget, factors, phase_fractions: as `build_curriculum` takes them.
        print_plan: print the phases (`describe_curriculum`) on the main process when training starts.
    """

    def __init__(
        self,
        config: AdscLlavaConfig,
        target_budget: float,
        factors: tuple[float, ...] = CURRICULUM_FACTORS["reverse"],
        phase_fractions: tuple[float, ...] | None = None,
        print_plan: bool = False,
    ):
        self.config = config
        self.target_budget = target_budget
        self.factors = factors
        self.phase_fractions = phase_fractions
        self.print_plan = print_plan
        self.phases: list[CurriculumPhase] = []
        self.current: CurriculumPhase | None = None

    def apply(self, step: int) -> CurriculumPhase:
        self.current = phase_at(self.phases, step)
        self.config.adsc_drop_ratio = self.current.drop_ratio
        return self.current

    def on_train_begin(self, args, state, control, **kwargs):
        self.phases = build_curriculum(
            self.config, self.target_budget, state.max_steps, self.factors, self.phase_fractions
        )
        if self.print_plan and state.is_world_process_zero:
            print(f"Curriculum over {state.max_steps} steps to budget {self.target_budget:g}:", flush=True)
            print(describe_curriculum(self.config, self.phases), flush=True)
        self.apply(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.apply(state.global_step)

    def log_values(self) -> dict[str, float]:
        """The phase the last step trained in, as metrics: `adsc/phase` (1-based), `adsc/budget`, `adsc/drop_ratio`."""
        if self.current is None:
            return {}
        phase = self.current
        return {
            "adsc/phase": self.phases.index(phase) + 1,
            "adsc/budget": phase.budget,
            "adsc/drop_ratio": phase.drop_ratio,
        }


def describe_curriculum(config: AdscLlavaConfig, phases: list[CurriculumPhase]) -> str:
    """One line per phase: steps, budget, r and the tokens each layer sees (run-length encoded)."""
    lines = []
    for number, phase in enumerate(phases, start=1):
        num_layers, layers = config.text_config.num_hidden_layers, config.adsc_pruning_layers
        tokens = vision_tokens_per_layer(num_layers, layers, phase.drop_ratio, config.reference_vision_tokens)
        lines.append(
            f"  phase {number}: steps {phase.first_step}-{max(phase.end_step - 1, phase.first_step)}  "
            f"{phase.factor:g}x -> budget {phase.budget:.1f}  r={phase.drop_ratio:.4f}  "
            f"tokens/layer {format_schedule(tokens)}"
        )
    return "\n".join(lines)
