"""The reference policy's calibration data (its `calibration` hook): frames from reference-world episodes,
as the robot will see them.

Episodes are driven by the scripted expert with perturbations, so the frames cover approaching,
turning and recovering. Seeds come from a range that neither training nor evaluation uses.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from calibration.sources import CalibrationSample
from reference_world.expert import expert_action
from reference_world.world import TabletopWorld

CALIBRATION_SEED_BASE = 7_000_000


class ReferenceWorldSource:
    def __init__(self, samples: int, seed_base: int = CALIBRATION_SEED_BASE, every: int = 3,
                 noise: float = 0.3, heldout_paraphrase: bool = False):
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.samples = samples
        self.seed_base = seed_base
        self.every = every
        self.noise = noise
        self.heldout_paraphrase = heldout_paraphrase

    def describe(self) -> dict:
        return {"kind": "reference-world", "samples": self.samples, "seed_base": self.seed_base,
                "frame_every_steps": self.every, "expert_noise": self.noise,
                "heldout_paraphrase": self.heldout_paraphrase}

    def __iter__(self) -> Iterator[CalibrationSample]:
        world = TabletopWorld()
        produced = 0
        seed = self.seed_base
        while produced < self.samples:
            rng = np.random.default_rng(seed)
            obs = world.reset(seed, heldout_paraphrase=self.heldout_paraphrase)
            seed += 1
            while not world.done and produced < self.samples:
                if obs.step % self.every == 0:
                    yield CalibrationSample(obs.frame, obs.instruction, obs.proprio.copy(), episode=seed - 1)
                    produced += 1
                action = expert_action(world) + self.noise * rng.standard_normal(2).astype(np.float32)
                obs = world.step(np.clip(action, -1.0, 1.0))
