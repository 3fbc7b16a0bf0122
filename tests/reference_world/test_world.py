"""Tests of the reference task world, its instructions, its expert and the episode runner."""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    NOVEL_COLOUR_BGR,
    NOVEL_COLOUR_NAME,
    OBJECT_CATALOGUE,
    OBJECT_NAMES,
    OOD_VARIANTS,
    ROBOT_RADIUS_M,
    TabletopWorld,
    WorldConfig,
    metres_to_pixels,
)

CFG = WorldConfig()
QUIET = WorldConfig(pixel_noise_sigma=0.0)  # noise-free frames for pixel-exact checks


def expert_policy(world: TabletopWorld):
    return lambda _obs: expert_action(world)


def pixel(config: WorldConfig, point_m) -> tuple[int, int]:
    u, v = np.round(metres_to_pixels(config, point_m)).astype(int)
    return int(u), int(v)


def patch_mean(frame: np.ndarray, centre_px: tuple[int, int], half: int = 2) -> np.ndarray:
    u, v = centre_px
    return frame[v - half : v + half + 1, u - half : u + half + 1].reshape(-1, 3).mean(axis=0)


def hue_of(bgr) -> float:
    """OpenCV hue (0-180) of a BGR colour."""
    colour = np.clip(np.round(np.asarray(bgr, dtype=np.float64)), 0, 255).astype(np.uint8).reshape(1, 1, 3)
    return float(cv2.cvtColor(colour, cv2.COLOR_BGR2HSV)[0, 0, 0])


def hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 180
    return min(d, 180 - d)


def away_from_robot(world: TabletopWorld) -> np.ndarray:
    """Boolean (H, W) mask of pixels clear of the robot disc."""
    cfg = world.config
    x, y, _ = world.pose
    us, vs = np.meshgrid(np.arange(cfg.frame_width_px), np.arange(cfg.frame_height_px))
    cu, cv = metres_to_pixels(cfg, (x, y))
    radius_px = (ROBOT_RADIUS_M + 0.02) * cfg.frame_width_px / cfg.table_width_m
    return (us - cu) ** 2 + (vs - cv) ** 2 > radius_px**2


# ------------------------------------------------------------------------------------ observations
def test_observation_types_and_shapes():
    world = TabletopWorld()
    obs = world.reset(seed=3)
    assert obs.frame.dtype == np.uint8 and obs.frame.shape == (240, 320, 3)
    assert obs.proprio.dtype == np.float32 and obs.proprio.shape == (2,)
    assert obs.step == 0 and obs.instruction == world.instruction
    obs = world.step([0.5, 0.2])
    assert obs.frame.dtype == np.uint8 and obs.frame.shape == (240, 320, 3)
    assert obs.step == 1 and world.steps == 1
    assert np.allclose(obs.proprio, world.wheel_velocity / CFG.max_wheel_speed_m_s)
    assert world.target_name in OBJECT_NAMES
    assert set(world.objects) == set(OBJECT_NAMES)
    assert np.allclose(world.target_position, world.objects[world.target_name])


def test_same_seed_gives_identical_frames_and_poses():
    actions = np.random.default_rng(0).uniform(-1, 1, size=(20, 2))
    a, b = TabletopWorld(), TabletopWorld()
    obs_a, obs_b = a.reset(seed=11), b.reset(seed=11)
    assert np.array_equal(obs_a.frame, obs_b.frame)
    for action in actions:
        obs_a, obs_b = a.step(action), b.step(action)
        assert np.array_equal(obs_a.frame, obs_b.frame)
        assert a.pose == b.pose
        assert np.array_equal(obs_a.proprio, obs_b.proprio)
    # render() repeats the current step's frame, noise included.
    assert np.array_equal(a.render(), obs_a.frame)
    assert np.array_equal(a.render(), a.render())


def test_noise_differs_between_steps_but_not_between_renders():
    world = TabletopWorld()
    first = world.reset(seed=4).frame
    start = world.pose
    second = world.step([0.0, 0.0]).frame  # robot does not move: only the noise changes
    assert world.pose == start and not np.array_equal(first, second)
    assert np.abs(first.astype(int) - second.astype(int)).max() < 30  # noise, not a new scene


def test_different_seeds_give_different_layouts():
    world = TabletopWorld()
    world.reset(seed=1)
    objects_1, pose_1, frame_1 = world.objects, world.pose, world.render()
    world.reset(seed=2)
    assert any(np.linalg.norm(objects_1[n] - world.objects[n]) > 0.01 for n in OBJECT_NAMES)
    assert pose_1 != world.pose
    assert not np.array_equal(frame_1, world.render())


def test_choosing_the_target_keeps_the_layout():
    world = TabletopWorld()
    world.reset(seed=21)
    drawn_target, objects = world.target_name, world.objects
    other = next(name for name in OBJECT_NAMES if name != drawn_target)
    world.reset(seed=21, target=other)
    assert world.target_name == other
    assert all(np.array_equal(objects[n], world.objects[n]) for n in OBJECT_NAMES)
    assert "{" not in world.instruction and other in world.instruction


def test_layout_respects_margins_and_spacing():
    world = TabletopWorld()
    for seed in range(100):
        world.reset(seed=seed)
        x, y, theta = world.pose
        assert 0 < x < CFG.table_width_m and 0 < y < CFG.table_height_m and -math.pi <= theta <= math.pi
        points = [np.array([x, y])] + [world.objects[n] for n in OBJECT_NAMES]
        for p in points[1:]:
            assert 0.05 + 0.04 <= p[0] <= CFG.table_width_m - 0.09 + 1e-12
            assert 0.05 + 0.04 <= p[1] <= CFG.table_height_m - 0.09 + 1e-12
        for i in range(len(points)):
            for j in range(i + 1, len(points)):
                assert np.linalg.norm(points[i] - points[j]) >= 0.15
        assert not world.success and world.distance_to_target_m > CFG.success_radius_m


def test_rendered_objects_show_their_colour_at_their_position():
    world = TabletopWorld()
    for seed in (0, 5, 9):
        obs = world.reset(seed=seed)
        for name in OBJECT_NAMES:
            colour = patch_mean(obs.frame, pixel(CFG, world.objects[name]))
            expected = hue_of(OBJECT_CATALOGUE[name].colour_bgr)
            assert hue_distance(hue_of(colour), expected) < 12, (seed, name, colour)
            assert colour.max() - colour.min() > 60, (seed, name, colour)  # saturated, not table
        table = patch_mean(obs.frame, pixel(CFG, (0.5, 0.01)), half=1)  # the darker edge band
        centre_of_empty = patch_mean(world.scene_background(include_objects=False), (160, 120))
        assert table.mean() < centre_of_empty.mean() - 15


def test_heading_wedge_points_where_the_robot_faces():
    world = TabletopWorld(QUIET)
    for seed in range(6):
        obs = world.reset(seed=seed)
        x, y, theta = world.pose
        frame = obs.frame.astype(np.int32)
        b, g, r = frame[..., 0], frame[..., 1], frame[..., 2]
        cu, cv = metres_to_pixels(QUIET, (x, y))
        vs, us = np.nonzero((b > 150) & (g > 150) & (b - r > 50) & ~away_from_robot(world))
        assert len(us) > 20
        offsets = np.stack([us - cu, vs - cv], axis=1)
        facing = np.array([math.cos(theta), -math.sin(theta)])  # y points down the image
        assert offsets.mean(axis=0) @ facing > 2.0, (seed, offsets.mean(axis=0), facing)
        tip = offsets[np.argmax(np.hypot(offsets[:, 0], offsets[:, 1]))]
        assert tip @ facing > 0.9 * np.linalg.norm(tip), (seed, tip, facing)


def test_small_motion_changes_the_image():
    world = TabletopWorld(QUIET)
    before = world.reset(seed=8).frame
    start = world.pose
    after = world.step([0.05, 0.05]).frame
    moved_px = math.dist(start[:2], world.pose[:2]) * QUIET.frame_width_px / QUIET.table_width_m
    assert 0 < moved_px < 0.5  # a sub-pixel move...
    assert not np.array_equal(before, after)  # ...still shows in the anti-aliased edges


# ------------------------------------------------------------------------------------------ physics
def test_motor_lag_and_acceleration_limit():
    world = TabletopWorld()
    world.reset(seed=2)
    speeds = []
    for _ in range(10):
        world.step([1.0, 1.0])
        speeds.append(world.wheel_velocity.copy())
    speeds = np.array(speeds)
    assert np.allclose(speeds[:, 0], speeds[:, 1])
    left = speeds[:, 0]
    assert 0 < left[0] < 0.9 * CFG.max_wheel_speed_m_s  # not instantly at the target
    assert np.all(np.diff(left) >= -1e-12)  # approaches monotonically
    assert np.all(np.diff(np.concatenate([[0.0], left])) <= CFG.max_wheel_accel_m_s2 * CFG.dt_s + 1e-9)
    assert left[-1] > 0.98 * CFG.max_wheel_speed_m_s
    assert np.all(left <= CFG.max_wheel_speed_m_s + 1e-12)
    assert np.allclose(world.proprio, left[-1] / CFG.max_wheel_speed_m_s)


def test_forward_motion_and_turn_direction():
    world = TabletopWorld()
    world.reset(seed=13)
    x0, y0, theta0 = world.pose
    world.step([0.6, 0.6])
    x1, y1, theta1 = world.pose
    assert theta1 == pytest.approx(theta0)
    direction = np.array([x1 - x0, y1 - y0]) / math.hypot(x1 - x0, y1 - y0)
    assert direction == pytest.approx([math.cos(theta0), -math.sin(theta0)], abs=1e-6)
    # Right wheel faster: w = (r - l) / wheel_base > 0, counter-clockwise on the image.
    world.reset(seed=13)
    world.step([-0.5, 0.5])
    _, _, theta2 = world.pose
    turned = (theta2 - theta0 + math.pi) % (2 * math.pi) - math.pi
    assert turned > 0.05
    assert world.pose[:2] == pytest.approx((x0, y0), abs=1e-9)  # spinning in place


def test_robot_stays_on_the_table():
    world = TabletopWorld(WorldConfig(time_limit_steps=400))
    for seed in (0, 1, 2):
        world.reset(seed=seed, variant="absent_object")  # driving over the target must not end it
        for _ in range(60):
            world.step([1.0, 1.0])
            x, y, _ = world.pose
            assert ROBOT_RADIUS_M - 1e-12 <= x <= CFG.table_width_m - ROBOT_RADIUS_M + 1e-12
            assert ROBOT_RADIUS_M - 1e-12 <= y <= CFG.table_height_m - ROBOT_RADIUS_M + 1e-12
        x, y, _ = world.pose
        at_edge = min(
            x - ROBOT_RADIUS_M,
            CFG.table_width_m - ROBOT_RADIUS_M - x,
            y - ROBOT_RADIUS_M,
            CFG.table_height_m - ROBOT_RADIUS_M - y,
        )
        assert at_edge < 1e-9  # 15 s at full speed reaches an edge and is held there


def test_actions_are_clipped():
    world = TabletopWorld()
    world.reset(seed=5)
    world.step(np.array([5.0, -7.0]))
    assert np.array_equal(world.last_action, np.array([1.0, -1.0], dtype=np.float32))
    for _ in range(10):
        world.step((3.0, -3.0))
    assert np.all(np.abs(world.wheel_velocity) <= CFG.max_wheel_speed_m_s + 1e-12)
    assert np.all(np.abs(world.proprio) <= 1.0)


def test_nan_action_is_treated_as_zero():
    world = TabletopWorld()
    world.reset(seed=6)
    start = world.pose
    for _ in range(5):
        obs = world.step([float("nan"), float("nan")])
    assert world.pose == start
    assert np.array_equal(world.wheel_velocity, np.zeros(2))
    assert np.all(np.isfinite(obs.proprio))
    world.step([float("nan"), 1.0])
    assert np.array_equal(world.last_action, np.array([0.0, 1.0], dtype=np.float32))
    assert all(math.isfinite(v) for v in world.pose)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(allow_nan=True, allow_infinity=True, width=32),
            st.floats(allow_nan=True, allow_infinity=True, width=32),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_any_numeric_action_keeps_the_state_finite_and_bounded(actions):
    world = TabletopWorld()
    world.reset(seed=1)
    for action in actions:
        obs = world.step(action)
        assert np.all(np.abs(world.last_action) <= 1.0)
        assert all(math.isfinite(v) for v in world.pose)
        assert np.all(np.abs(obs.proprio) <= 1.0)


@pytest.mark.parametrize("bad", [np.zeros(3), [[0.1, 0.2]], 0.5, [], ["a", "b"]])
def test_bad_action_shape_raises_value_error(bad):
    world = TabletopWorld()
    world.reset(seed=0)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        world.step(bad)
    assert world.steps == 0


def test_bad_reset_arguments_raise_value_error():
    world = TabletopWorld()
    with pytest.raises(ValueError, match="black_frame") as info:
        world.reset(seed=0, variant="foggy")
    assert all(v in str(info.value) for v in OOD_VARIANTS)
    with pytest.raises(ValueError, match="red block"):
        world.reset(seed=0, target="pink elephant")
    with pytest.raises(ValueError, match="seed"):
        world.reset(seed=-1)
    with pytest.raises(ValueError, match="dt_s"):
        WorldConfig(dt_s=0.0)
    with pytest.raises(ValueError, match="frame_width_px"):
        WorldConfig(frame_width_px=0)


def test_step_before_reset_and_after_done_raise():
    world = TabletopWorld(WorldConfig(time_limit_steps=3))
    with pytest.raises(RuntimeError, match="reset"):
        world.step([0.0, 0.0])
    world.reset(seed=0)
    for _ in range(3):
        assert not world.done
        world.step([0.0, 0.0])
    assert world.done and not world.success and world.steps == 3
    with pytest.raises(RuntimeError, match="done"):
        world.step([0.0, 0.0])


# ------------------------------------------------------------------------------------------- expert
def test_expert_reaches_the_target_in_at_least_98_percent_of_seeds():
    world = TabletopWorld()
    results = [run_episode(world, expert_policy(world), seed) for seed in range(60)]
    successes = sum(r.success for r in results)
    assert successes >= 0.98 * len(results), [r.seed for r in results if not r.success]
    for r in results:
        if r.success:
            assert r.final_distance_m <= CFG.success_radius_m and r.steps < CFG.time_limit_steps
    assert {r.target for r in results} == set(OBJECT_NAMES)  # targets are drawn from every object


def test_expert_with_heldout_paraphrases():
    world = TabletopWorld()
    heldout = set(all_heldout_instructions())
    results = [run_episode(world, expert_policy(world), seed, heldout_paraphrase=True) for seed in range(60)]
    assert all(r.instruction in heldout for r in results)
    assert sum(r.success for r in results) >= 0.98 * len(results)


@pytest.mark.parametrize("seed", [17, 23, 40])
def test_expert_is_smooth_and_bounded(seed):
    world = TabletopWorld()
    actions = []
    run_episode(world, expert_policy(world), seed, on_step=lambda _obs, action: actions.append(action))
    actions = np.array(actions)
    assert actions.dtype == np.float32 and np.all(np.abs(actions) <= 1.0)
    # Consecutive commands change gradually (no bang-bang), from the first step on.
    assert np.max(np.abs(np.diff(actions, axis=0))) < 0.45
    # No chattering: the turn command never flips sign back and forth.
    turn = actions[:, 1] - actions[:, 0]
    significant = turn[np.abs(turn) > 0.05]
    assert np.count_nonzero(np.diff(np.sign(significant))) <= 1


# ------------------------------------------------------------------------------------- OOD variants
def test_black_frame_variant_is_all_zeros():
    world = TabletopWorld()
    obs = world.reset(seed=3, variant="black_frame")
    assert obs.frame.shape == (240, 320, 3) and not obs.frame.any()
    obs = world.step([1.0, 0.5])
    assert not obs.frame.any() and not world.render().any()


def test_heavy_noise_variant_has_much_larger_noise():
    def noise_std(world: TabletopWorld, frame: np.ndarray) -> float:
        diff = frame.astype(np.float64) - world.scene_background().astype(np.float64)
        return float(diff[away_from_robot(world)].std())

    world = TabletopWorld()
    normal = noise_std(world, world.reset(seed=12).frame)
    heavy = noise_std(world, world.reset(seed=12, variant="heavy_noise").frame)
    assert 2.0 < normal < 4.5
    assert 40.0 < heavy < 70.0  # sigma 60, a little less where it saturates at 0 or 255


def test_novel_colour_variant_paints_and_names_a_new_colour():
    world = TabletopWorld(QUIET)
    normal_frame = world.reset(seed=10).frame
    target, instruction = world.target_name, world.instruction
    obs = world.reset(seed=10, variant="novel_colour")
    assert world.target_name == target  # ground truth keeps the catalogue name
    noun = OBJECT_CATALOGUE[target].noun
    assert f"{NOVEL_COLOUR_NAME} {noun}" in obs.instruction
    assert target.split()[0] not in obs.instruction and obs.instruction != instruction
    colour = patch_mean(obs.frame, pixel(QUIET, world.target_position))
    assert hue_distance(hue_of(colour), hue_of(NOVEL_COLOUR_BGR)) < 12
    assert all(hue_distance(hue_of(colour), hue_of(s.colour_bgr)) > 25 for s in OBJECT_CATALOGUE.values())
    for name in OBJECT_NAMES:
        if name != target:  # the others are unchanged
            centre = pixel(QUIET, world.objects[name])
            assert np.array_equal(patch_mean(obs.frame, centre), patch_mean(normal_frame, centre))
    heldout = world.reset(seed=10, variant="novel_colour", heldout_paraphrase=True).instruction
    assert f"{NOVEL_COLOUR_NAME} {noun}" in heldout


def test_absent_object_variant_hides_the_target_and_never_succeeds():
    world = TabletopWorld(QUIET)
    normal_frame = world.reset(seed=14).frame
    target = world.target_name
    obs = world.reset(seed=14, variant="absent_object")
    assert world.target_name == target and target in obs.instruction
    assert target not in world.visible_objects and len(world.visible_objects) == 3
    centre = pixel(QUIET, world.target_position)
    empty_table = world.scene_background(include_objects=False)
    assert np.abs(patch_mean(obs.frame, centre) - patch_mean(empty_table, centre)).max() < 1.0
    assert np.abs(patch_mean(normal_frame, centre) - patch_mean(empty_table, centre)).max() > 30
    # The expert drives onto the (invisible) target's spot, yet the episode only ends by time limit.
    result = run_episode(world, expert_policy(world), 14, variant="absent_object")
    assert not result.success and result.steps == QUIET.time_limit_steps
    assert result.final_distance_m < QUIET.success_radius_m


# ------------------------------------------------------------------------------------- instructions
def test_heldout_templates_are_disjoint_from_training_templates():
    assert len(TRAINING_TEMPLATES) >= 6 and len(HELDOUT_PARAPHRASES) >= 6
    for heldout in HELDOUT_PARAPHRASES:
        held = heldout.format(object="X")
        for training in TRAINING_TEMPLATES:
            train = training.format(object="X")
            assert held != train and held not in train and train not in held, (heldout, training)
    assert not set(all_training_instructions()) & set(all_heldout_instructions())


def test_instruction_sets_and_draws():
    training = all_training_instructions()
    assert len(training) == len(TRAINING_TEMPLATES) * len(OBJECT_NAMES) == len(set(training))
    assert len(all_heldout_instructions()) == len(HELDOUT_PARAPHRASES) * len(OBJECT_NAMES)
    rng = np.random.default_rng(0)
    drawn = {training_instruction("blue ball", rng) for _ in range(200)}
    assert drawn == {t.format(object="blue ball") for t in TRAINING_TEMPLATES}
    assert heldout_instruction("red block", rng) in all_heldout_instructions()
    with pytest.raises(ValueError):
        training_instruction("", rng)
    world = TabletopWorld()
    assert world.reset(seed=2, instruction="please go to the red block").instruction == (
        "please go to the red block"
    )
    assert world.reset(seed=2).instruction in training


# ----------------------------------------------------------------------------------------- episodes
def test_run_episode_records_trajectory_and_applied_actions():
    world = TabletopWorld()
    seen = []

    def policy(obs):
        return np.array([2.0, 2.0]) if obs.step < 2 else expert_action(world)

    result = run_episode(world, policy, 30, target="blue ball", on_step=lambda o, a: seen.append((o.step, a)))
    assert isinstance(result, EpisodeResult)
    assert result.target == "blue ball" and result.seed == 30 and result.variant is None
    assert result.trajectory.shape == (result.steps + 1, 3)
    world.reset(seed=30, target="blue ball")
    assert tuple(result.trajectory[0]) == world.pose
    assert [step for step, _ in seen] == list(range(result.steps))
    assert np.array_equal(seen[0][1], np.array([1.0, 1.0], dtype=np.float32))  # the clipped action
    assert result.success and result.final_distance_m <= CFG.success_radius_m


def test_draw_trajectories_writes_a_png(tmp_path):
    world = TabletopWorld()
    results = [run_episode(world, expert_policy(world), seed) for seed in (0, 1)]
    path = tmp_path / "plots" / "trajectories.png"
    draw_trajectories(world, results, path)
    image = cv2.imread(str(path))
    assert image is not None and image.shape == (480, 640, 3)
    # Different scenes: the background is the bare table (first episode's lighting), plus the drawings.
    world.reset(seed=results[0].seed)
    blank = cv2.resize(world.scene_background(include_objects=False), (640, 480))
    changed = np.abs(image.astype(int) - blank.astype(int)).max(axis=2) > 40
    assert 300 < np.count_nonzero(changed) < 0.2 * changed.size
    for result in results:  # each path passes through its midpoint
        u, v = pixel(CFG, result.trajectory[len(result.trajectory) // 2, :2])
        assert changed[2 * v - 2 : 2 * v + 3, 2 * u - 2 : 2 * u + 3].any()

    single = tmp_path / "single.png"
    draw_trajectories(CFG, results[:1], single)
    image = cv2.imread(str(single))
    world.reset(seed=results[0].seed)
    # One scene: its objects are the background (checked on one the path does not cross).
    for name in OBJECT_NAMES:
        if name == world.target_name:
            continue
        u, v = pixel(CFG, world.objects[name])
        pixel_bgr = image[2 * v, 2 * u]
        assert hue_distance(hue_of(pixel_bgr), hue_of(OBJECT_CATALOGUE[name].colour_bgr)) < 12, name


def test_draw_trajectories_marks_a_failed_episode(tmp_path):
    # A failure ends in a tilted cross instead of a dot; the absent-object scene can never succeed.
    world = TabletopWorld(WorldConfig(time_limit_steps=10))
    result = run_episode(world, expert_policy(world), 3, variant="absent_object")
    assert not result.success
    path = tmp_path / "failed.png"
    draw_trajectories(world, [result], path)
    image = cv2.imread(str(path))
    u, v = pixel(CFG, result.trajectory[-1, :2])
    world.reset(seed=3, variant="absent_object")
    background = cv2.resize(world.scene_background(), (640, 480))
    around_end = np.abs(image.astype(int) - background.astype(int))[2 * v - 8 : 2 * v + 9, 2 * u - 8 : 2 * u + 9]
    assert (around_end.max(axis=2) > 40).sum() > 20


def test_a_picture_marks_poses_in_fallback_and_a_stop_in_fallback_and_says_how_it_ended(tmp_path):
    # The demo's absent-object episode: the runtime fell back from the middle of the path on and the robot
    # came to rest there. The picture shows the fallback poses, a stop sign at the end and the outcome.
    world = TabletopWorld(WorldConfig(time_limit_steps=20))
    plain = run_episode(world, expert_policy(world), 3, variant="absent_object")
    flags = np.zeros(len(plain.trajectory), dtype=bool)
    flags[len(flags) // 2:] = True
    marked = dataclasses.replace(plain, fallback=flags, stopped_in_fallback=True,
                                 outcome="stopped in fallback (feature_novelty)")
    draw_trajectories(world, [plain], tmp_path / "plain.png")
    draw_trajectories(world, [marked], tmp_path / "marked.png")
    before, after = (cv2.imread(str(tmp_path / name)).astype(int) for name in ("plain.png", "marked.png"))
    red = (after[..., 2] > 180) & (after[..., 1] < 90) & (after[..., 0] < 90)
    was_red = (before[..., 2] > 180) & (before[..., 1] < 90) & (before[..., 0] < 90)
    u, v = pixel(CFG, plain.trajectory[-1, :2])
    assert (red & ~was_red)[2 * v - 6 : 2 * v + 7, 2 * u - 6 : 2 * u + 7].sum() > 40, "a stop sign where the robot rests"
    first = plain.trajectory[len(flags) // 2, :2]
    if np.linalg.norm(first - plain.trajectory[-1, :2]) > 0.05:  # away from the stop sign
        u, v = pixel(CFG, first)
        assert (red & ~was_red)[2 * v - 3 : 2 * v + 4, 2 * u - 3 : 2 * u + 4].any(), "the first pose in fallback"
    u, v = pixel(CFG, plain.trajectory[1, :2])
    assert not (red & ~was_red)[2 * v - 2 : 2 * v + 3, 2 * u - 2 : 2 * u + 3].any(), "nominal poses stay unmarked"
    caption = np.abs(after - before)[-40:, :300].max(axis=2) > 100
    assert caption.sum() > 200, "the outcome is written along the bottom"
