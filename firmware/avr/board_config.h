/* Configuration of the reference board: an Arduino Mega 2560 driving two DC motors with quadrature
 * encoders through a TB6612FNG-style dual H-bridge (docs/firmware.md, "Wiring" and "Configuration").
 * Change these for your robot; the channel layout is what Capabilities announce to the host. */
#ifndef BOARD_CONFIG_H
#define BOARD_CONFIG_H

#include "../core/fw_controller.h"

#define BOARD_CHANNELS 2u
#define BOARD_WATCHDOG_TIMEOUT_MS 300u /* docs/serial-protocol.md, section 6; the host assumes 300 */
#define BOARD_TELEMETRY_PERIOD_MS 20u  /* 50 Hz */

/* Encoder counts per wheel revolution with 2x decoding (both edges of channel A), gearbox included. */
#define BOARD_COUNTS_PER_REV 1440.0f
/* Wheel speed at a normalised velocity of 1.0, in rad/s: velocity targets and telemetry use it. */
#define BOARD_MAX_SPEED_RAD_S 10.0f
/* Position channels (if you announce any): duty per unit of position error, a plain P controller. */
#define BOARD_POSITION_GAIN 4.0f

/* PWM: Timer1 fast PWM with ICR1 as TOP; 16 MHz / (799 + 1) = 20 kHz, above hearing. */
#define BOARD_PWM_TOP 799u

/* Velocity estimate: encoder counts differenced over this window. */
#define BOARD_VELOCITY_WINDOW_MS 10u

/* The channel layout Capabilities announce: kinds (FW_KIND_VELOCITY, FW_KIND_POSITION or both) and, for
 * the position kind, the limits in rad of the wheel or joint. The reference robot: two velocity wheels.
 * Override from make with the kinds' bits, e.g. AVR_DEFS=-DBOARD_CHANNEL1_KINDS=0x03 (velocity and position)
 * in a fresh BUILD directory. */
#ifndef BOARD_CHANNEL0_KINDS
#define BOARD_CHANNEL0_KINDS FW_KIND_VELOCITY
#endif
#ifndef BOARD_CHANNEL1_KINDS
#define BOARD_CHANNEL1_KINDS FW_KIND_VELOCITY
#endif
#ifndef BOARD_POSITION_MIN
#define BOARD_POSITION_MIN (-3.14159265f)
#endif
#ifndef BOARD_POSITION_MAX
#define BOARD_POSITION_MAX 3.14159265f
#endif

extern const fw_config_t board_firmware_config;

#endif
