"""The ATmega2560 image and the Arduino sketch build with Debian's avr-gcc; the size report is printed."""

from __future__ import annotations

import re

import pytest

from tests.firmware import build

FLASH_BYTES, RAM_BYTES = 256 * 1024, 8 * 1024  # ATmega2560
STACK_RESERVE_BYTES = 1024  # the deepest call (telemetry: payload, frame and CRC buffers) needs about 400


@pytest.fixture(scope="module")
def avr_tools():
    missing = build.missing_tools("make", "avr-gcc", "avr-objcopy", "avr-size")
    if missing:
        pytest.skip(f"the AVR build needs {', '.join(missing)} (apt-get install gcc-avr avr-libc binutils-avr)")


def test_avr_image_builds_and_fits_with_room_for_the_stack(avr_tools, tmp_path):
    report = build.make("avr", tmp_path)
    program = re.search(r"Program:\s+(\d+) bytes", report)
    data = re.search(r"Data:\s+(\d+) bytes", report)
    assert program and data, report
    flash, ram = int(program.group(1)), int(data.group(1))
    print(f"\nATmega2560 image: flash {flash} bytes, RAM {ram} bytes (static)")
    assert 0 < flash < FLASH_BYTES and 0 < ram < RAM_BYTES - STACK_RESERVE_BYTES
    hex_file = tmp_path / "avr" / "vla_motor_controller.hex"
    assert hex_file.read_text().startswith(":") and hex_file.read_text().rstrip().endswith(":00000001FF")


def test_arduino_sketch_compiles_and_links_with_the_board_layer(avr_tools, tmp_path):
    if build.missing_tools("avr-g++"):
        pytest.skip("the sketch check needs avr-g++ (apt-get install gcc-avr)")
    build.make("arduino", tmp_path)
    sketch = tmp_path / "arduino" / "vla_motor_controller"
    assert (sketch / "vla_motor_controller.ino").is_file()
    assert (sketch / "src" / "core" / "fw_controller.c").is_file() and (sketch / "src" / "avr" / "board_avr.c").is_file()
    assert (tmp_path / "arduino" / "sketch_check.elf").stat().st_size > 0
