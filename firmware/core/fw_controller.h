/* The motor controller of serial protocol v2 (docs/serial-protocol.md, section 6): applied targets,
 * watchdog, e-stop latch, fault state, rejection counters, Capabilities and telemetry scheduling.
 *
 * One static instance, no dynamic allocation. The board's main loop calls fw_rx_byte() for every
 * received byte and fw_poll() at least every 10 ms (the reference board: every 1 ms). */
#ifndef FW_CONTROLLER_H
#define FW_CONTROLLER_H

#include <stdint.h>

#include "fw_board.h"
#include "fw_protocol.h"

#define FW_FIRMWARE_MAJOR 1u
#define FW_FIRMWARE_MINOR 0u
#define FW_FIRMWARE_PATCH 0u

/* Telemetry "values" rule: the controller never reports more than this (section 6). */
#define FW_MAX_REPORTED_VELOCITY 2.0f
#define FW_MAX_REPORTED_POSITION 1.0e6f

typedef struct {
    uint8_t kinds; /* FW_KIND_VELOCITY | FW_KIND_POSITION; never 0 */
    float position_min;
    float position_max;
} fw_channel_config_t;

typedef struct {
    uint8_t channel_count; /* 1..FW_MAX_CHANNELS */
    uint16_t watchdog_timeout_ms;
    uint16_t telemetry_period_ms;
    fw_channel_config_t channels[FW_MAX_CHANNELS];
} fw_config_t;

/* A snapshot of the state telemetry reports, for tests and board diagnostics. */
typedef struct {
    uint8_t status;
    uint8_t fault_code;
    uint16_t last_command_seq;
    uint16_t rejected[FW_REJECTION_COUNT];
    fw_outputs_t outputs;
} fw_state_t;

/* 0 on success; -1 when the config breaks a rule of Capabilities (the controller then stays stopped
 * with FAULT INTERNAL and still answers, so the host reports it). Resets all state; motors stopped,
 * WATCHDOG_TRIPPED set, as at power-up. The config must outlive the controller. */
int fw_init(const fw_config_t *config);
void fw_rx_byte(uint8_t byte);
void fw_poll(void);
/* The board's own verdicts (driver error pin, over-current): FAULT with `code` (1..255) / cleared. */
void fw_set_fault(uint8_t code);
void fw_clear_fault(void);
void fw_get_state(fw_state_t *state);

#endif
