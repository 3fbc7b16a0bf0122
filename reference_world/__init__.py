"""Reference task world: a top-down tabletop with a differential-drive robot.

Test, calibration and demo infrastructure. The runtime never imports it; it talks to the
world only through the simulated motor controller (a serial device and a camera stream).
"""

from reference_world.episodes import EpisodeResult, draw_trajectories, run_episode
from reference_world.expert import expert_action
from reference_world.instructions import (
    HELDOUT_PARAPHRASES,
    TRAINING_TEMPLATES,
    all_heldout_instructions,
    all_training_instructions,
    heldout_instruction,
    training_instruction,
)
from reference_world.world import (
    OBJECT_NAMES,
    OOD_VARIANTS,
    Observation,
    TabletopWorld,
    WorldConfig,
)

__all__ = [
    "OBJECT_NAMES",
    "OOD_VARIANTS",
    "HELDOUT_PARAPHRASES",
    "TRAINING_TEMPLATES",
    "EpisodeResult",
    "Observation",
    "TabletopWorld",
    "WorldConfig",
    "all_heldout_instructions",
    "all_training_instructions",
    "draw_trajectories",
    "expert_action",
    "heldout_instruction",
    "run_episode",
    "training_instruction",
]
