"""The binary in the loop: `vla-edge run` drives the reference firmware's AVR image running in simavr.

The service under test is the real entry point (``python -m edge.cli run``) with a tiny policy bundle
built through ``build-engines --policy``; its serial port is the pty of firmware/sim/avr_pty_runner.c,
which runs the same ELF that ``make -C firmware avr`` builds for the Mega 2560, and reports the chip's
PWM and driver pins in emulated time. Checked: commands arrive and the PWM follows them, telemetry
returns, after SIGKILL of the service the firmware's watchdog zeroes the PWM 300 ms (emulated) after
the last frame, an e-stop stops the PWM at once, latches, and is reported. The measured times are
printed (docs/firmware.md records them).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.build_engines.tiny_policies import INSTRUCTIONS
from tests.faults.harness import ServiceProcess, short_tempdir, wait_for, write_robot_config
from tests.firmware import build
from tests.firmware.emulator import PWM_TOP, AvrEmulator

WATCHDOG_TIMEOUT_MS = 300  # firmware/avr/board_config.h, announced in Capabilities
POLL_MS = 1  # fw_poll() runs every 1 ms tick
MAIN_LOOP_MS = 1.5  # the longest main-loop iteration: a poll that sends telemetry (0.9 ms), with room
SAMPLE_MS = 0.1  # the runner samples the pins every 100 us
DRIVE_TIMEOUT_S = 120.0  # hang guards only
SETTLE_S = 1.5


def _has_simavr() -> bool:
    return subprocess.run(["pkg-config", "--exists", "simavr"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def firmware_images(tmp_path_factory):
    missing = build.missing_tools("make", "cc", "avr-gcc", "avr-objcopy", "avr-size", "pkg-config")
    if missing or not _has_simavr():
        pytest.skip(f"the emulated firmware needs {', '.join(missing) or 'libsimavr-dev'} "
                    "(apt-get install gcc-avr avr-libc libsimavr-dev libelf-dev pkg-config)")
    out = tmp_path_factory.mktemp("firmware")
    build.make("avr", out)
    build.make("sim", out)
    return out / "sim" / "avr_pty_runner", out / "avr" / "vla_motor_controller.elf"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from build_engines import cli

    out = tmp_path_factory.mktemp("tiny") / "bundle"
    assert cli.main(["--policy", "tests.build_engines.tiny_policies:image96", "--out", str(out), "--int8",
                     "--no-fp16", "--calib-samples", "32", "--heldout-samples", "8", "--tensorrt", "off",
                     "--log-level", "WARNING"]) == 0
    return out


@pytest.fixture
def camera():
    """An MJPEG stream of frames like the tiny policy's calibration episodes (in distribution)."""
    from simulator.mjpeg import MjpegServer

    rng = np.random.default_rng(3)
    server = MjpegServer(lambda: np.clip(80 + rng.integers(0, 40, (96, 96, 3)), 0, 255).astype(np.uint8), fps=10.0)
    server.start()
    yield server.url
    server.stop()


def driving(pwm, rx):
    """The latest PWM sample once the motors are driven and host frames are arriving; else None."""
    if len(rx) >= 10 and pwm and not pwm[-1].stopped:
        return pwm[-1]
    return None


def stopped_after_last_frame(pwm, rx):
    """(last host frame, first stopped sample after it) once the host is silent and the PWM stopped."""
    if not rx:
        return None
    last = rx[-1]
    after = [s for s in pwm if s.t_us >= last and s.stopped]
    return (last, after[0]) if after else None


def start_service(workdir, emulator, bundle, camera_url, name):
    socket_path = workdir / f"{name}.sock"
    config = write_robot_config(workdir / f"{name}.yaml", bundle=bundle, serial_port=emulator.port,
                                camera_url=camera_url, socket_path=socket_path,
                                overrides={"uncertainty": {"threshold": 10.0, "hard_ceiling": 10.0}})
    service = ServiceProcess(workdir, config, socket_path, name=name).start()
    service.say(INSTRUCTIONS[0])
    return service


@pytest.mark.slow
def test_vla_edge_run_drives_the_emulated_firmware_watchdog_and_estop(firmware_images, tiny_bundle, camera):
    runner, elf = firmware_images
    workdir = short_tempdir("vla-fw-")
    emulator = AvrEmulator(runner, elf, workdir / "avr.log").start()
    services = []
    try:
        # 1. Commands arrive, the PWM follows them, telemetry returns.
        service = start_service(workdir, emulator, tiny_bundle, camera, "run1")
        services.append(service)
        emulator.wait_for(driving, DRIVE_TIMEOUT_S, "the PWM to follow the service's commands")
        status = service.status()
        command = status["tick"]["command"]
        quantum = 1.0 / PWM_TOP + 1e-6  # the duty is the command rounded to the PWM's resolution

        def shows_command(pwm, rx):
            return next((s for s in pwm if all(abs(d - c) <= quantum for d, c in zip(s.duties, command))), None)

        emulator.wait_for(shows_command, 2.0, f"the PWM to show the command {command}")
        controller = status["controller"]
        print(f"\nstatus while driving: command {command}, controller {controller}, link {status['link']}")
        assert status["link"]["connected"] and status["link"]["telemetry_age_s"] < 0.3
        assert status["link"]["stats"]["telemetry_frames"] > 0 and status["link"]["stats"]["capabilities_frames"] >= 1
        assert "MOTORS_ENABLED" in str(controller)

        # 2. SIGKILL the service: the firmware's own watchdog stops the motors.
        service.send_signal(signal.SIGKILL)
        service.wait_exit()
        last_frame_us, stop = emulator.wait_for(stopped_after_last_frame, 10.0, "the watchdog to stop the PWM")
        before = [s for s in emulator.snapshot()[0] if s.t_us < stop.t_us]
        assert before and not before[-1].stopped  # it was driving until the watchdog
        watchdog_ms = (stop.t_us - last_frame_us) / 1000.0
        print(f"watchdog: PWM zero {watchdog_ms:.1f} ms (emulated) after the last host frame")
        # Never early; at most one 1 ms tick late, plus the poll that trips it and the pin sampling.
        assert WATCHDOG_TIMEOUT_MS <= watchdog_ms <= WATCHDOG_TIMEOUT_MS + POLL_MS + MAIN_LOOP_MS + SAMPLE_MS
        assert stop.porta & 0x1F == 0x1F  # both motors braking (IN1 = IN2 = 1), driver on

        # 3. A new service drives again; its e-stop stops the PWM at once, latches and is reported.
        service = start_service(workdir, emulator, tiny_bundle, camera, "run2")
        services.append(service)
        emulator.wait_for(driving, DRIVE_TIMEOUT_S, "the PWM to follow the second service")
        _, rx_before = emulator.snapshot()
        assert service.request({"cmd": "estop"})["ok"]

        def estop_stop(pwm, rx):
            new = [t for t in rx if t > rx_before[-1]]
            stops = [s for s in pwm if new and s.t_us >= new[0] and s.stopped]
            return (max(t for t in new if t <= stops[0].t_us), stops[0]) if stops else None

        frame_us, stop = emulator.wait_for(estop_stop, 10.0, "the e-stop to stop the PWM")
        estop_ms = (stop.t_us - frame_us) / 1000.0
        print(f"e-stop: PWM zero {estop_ms:.2f} ms (emulated) after the frame's last byte reached the UART")
        # Applied in the receive path, after whatever the main loop was doing: at most one fw_poll with
        # its telemetry frame (0.9 ms of the 16 MHz chip's time, docs/firmware.md), never a poll later.
        assert estop_ms <= MAIN_LOOP_MS + SAMPLE_MS + 0.05

        def latched_and_confirmed():
            status = service.status()
            return status if status["estop"] and "ESTOP_LATCHED" in str(status["controller"]) else None

        status = wait_for(latched_and_confirmed, 5.0, "the controller to report ESTOP_LATCHED")
        print(f"status while latched: controller {status['controller']}")
        pwm_at_latch = len(emulator.snapshot()[0])
        time.sleep(SETTLE_S)
        later = emulator.snapshot()[0][pwm_at_latch - 1:]
        assert all(s.stopped for s in later), later
        assert "ESTOP_LATCHED" in str(service.status()["controller"])  # still latched, still reported

        # Released: the controller drops the latch, the motors wait for the next command, then drive.
        assert service.request({"cmd": "clear"})["ok"]
        wait_for(lambda: None if "ESTOP_LATCHED" in str(service.status()["controller"]) else True, 5.0,
                 "the controller to report the latch released")
        service.say(INSTRUCTIONS[1])
        emulator.wait_for(driving, DRIVE_TIMEOUT_S, "the PWM to follow commands after the release")
        # Emulated times stay exact when the emulation falls behind; the host then sees late telemetry.
        print(f"emulation behind the wall clock: {emulator.lag_us or 'never by more than 50 ms'}")
    except BaseException:
        print(f"logs kept in {workdir}")
        raise
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    finally:
        for service in services:
            service.stop()
        emulator.stop()
