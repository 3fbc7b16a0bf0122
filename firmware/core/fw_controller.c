/* Controller behaviour of serial protocol v2 (docs/serial-protocol.md, section 6); see fw_controller.h. */
#include "fw_controller.h"

#include <string.h>

#define TELEMETRY_FIXED_BYTES 24u
#define CAPABILITIES_FIXED_BYTES 10u
#define CAPABILITY_CHANNEL_BYTES 9u

static struct {
    const fw_config_t *config;
    uint8_t config_valid;
    fw_rx_t rx;
    uint16_t tx_seq;
    uint16_t last_command_seq;
    uint16_t rejected[FW_REJECTION_COUNT];
    uint8_t watchdog_tripped;
    uint8_t estop_latched;
    uint8_t board_fault;  /* fw_set_fault() */
    uint8_t sensor_fault; /* the core's own check of the encoder readings */
    uint32_t last_valid_command_ms;
    uint32_t next_telemetry_ms;
    fw_outputs_t outputs;
    fw_measured_t measured;
} fw;

static int config_is_valid(const fw_config_t *config)
{
    uint8_t k;
    if (config == 0 || config->channel_count < 1 || config->channel_count > FW_MAX_CHANNELS ||
        config->watchdog_timeout_ms == 0 || config->telemetry_period_ms == 0)
        return 0;
    for (k = 0; k < config->channel_count; k++) {
        const fw_channel_config_t *channel = &config->channels[k];
        if (channel->kinds == 0 || (channel->kinds & ~(FW_KIND_VELOCITY | FW_KIND_POSITION)) != 0)
            return 0;
        if (!fw_float_is_finite(channel->position_min) || !fw_float_is_finite(channel->position_max) ||
            !(channel->position_min <= channel->position_max))
            return 0;
    }
    return 1;
}

static uint8_t fault_code(void)
{
    if (!fw.config_valid)
        return FW_FAULT_INTERNAL;
    if (fw.board_fault)
        return fw.board_fault;
    return fw.sensor_fault;
}

static uint8_t status_flags(void)
{
    uint8_t status = 0;
    if (fw.watchdog_tripped)
        status |= FW_STATUS_WATCHDOG_TRIPPED;
    if (fw.estop_latched)
        status |= FW_STATUS_ESTOP_LATCHED;
    if (fault_code() != FW_FAULT_NONE)
        status |= FW_STATUS_FAULT;
    if (status == 0)
        status = FW_STATUS_MOTORS_ENABLED;
    return status;
}

/* "Stopping a channel": a velocity channel at zero, a position channel holding where it is now. A
 * channel keeps the kind it was last commanded in; a position-only channel is always held. */
static void stop_motors(void)
{
    uint8_t k;
    for (k = 0; k < fw.outputs.channel_count; k++) {
        uint8_t kinds = fw.config->channels[k].kinds;
        uint8_t bit = (uint8_t)(1u << k);
        if (kinds == FW_KIND_POSITION)
            fw.outputs.position_mask |= bit;
        else if (!(kinds & FW_KIND_POSITION))
            fw.outputs.position_mask &= (uint8_t)~bit;
        fw.outputs.target[k] = (fw.outputs.position_mask & bit) ? fw.measured.position[k] : 0.0f;
    }
}

static void count(enum fw_rejection reason)
{
    fw.rejected[reason]++; /* u16, wraps at 2^16 as the protocol says */
}

static void send(uint8_t type, const uint8_t *payload, uint8_t length)
{
    uint8_t frame[FW_MAX_FRAME_BYTES];
    size_t frame_length = fw_seal(type, fw.tx_seq++, payload, length, frame);
    board_uart_write(frame, (uint8_t)frame_length);
}

static void send_capabilities(void)
{
    uint8_t payload[CAPABILITIES_FIXED_BYTES + CAPABILITY_CHANNEL_BYTES * FW_MAX_CHANNELS];
    const fw_config_t *config = fw.config;
    uint8_t k, n = config->channel_count;
    payload[0] = FW_PROTOCOL_VERSION;
    payload[1] = FW_PROTOCOL_MINOR;
    payload[2] = FW_FIRMWARE_MAJOR;
    payload[3] = FW_FIRMWARE_MINOR;
    payload[4] = FW_FIRMWARE_PATCH;
    payload[5] = n;
    fw_write_u16_le(payload + 6, config->watchdog_timeout_ms);
    fw_write_u16_le(payload + 8, config->telemetry_period_ms);
    for (k = 0; k < n; k++) {
        const fw_channel_config_t *channel = &config->channels[k];
        uint8_t *p = payload + CAPABILITIES_FIXED_BYTES + CAPABILITY_CHANNEL_BYTES * k;
        int position = (channel->kinds & FW_KIND_POSITION) != 0;
        p[0] = channel->kinds;
        fw_write_f32_le(p + 1, position ? channel->position_min : 0.0f);
        fw_write_f32_le(p + 5, position ? channel->position_max : 0.0f);
    }
    send(FW_MSG_CAPABILITIES, payload, (uint8_t)(CAPABILITIES_FIXED_BYTES + CAPABILITY_CHANNEL_BYTES * n));
}

static void send_telemetry(uint32_t now_ms)
{
    uint8_t payload[TELEMETRY_FIXED_BYTES + 8u * FW_MAX_CHANNELS];
    uint8_t k, n = fw.config->channel_count, fault = fault_code();
    fw_write_u32_le(payload, now_ms);
    payload[4] = status_flags();
    payload[5] = fault;
    fw_write_u16_le(payload + 6, fw.last_command_seq);
    for (k = 0; k < FW_REJECTION_COUNT; k++)
        fw_write_u16_le(payload + 8 + 2 * k, fw.rejected[k]);
    payload[22] = n; /* n_vel */
    payload[23] = n; /* n_pos: every channel reports a position (a wheel its angle) */
    for (k = 0; k < n; k++) {
        fw_write_f32_le(payload + TELEMETRY_FIXED_BYTES + 4 * k, fw.measured.velocity[k]);
        fw_write_f32_le(payload + TELEMETRY_FIXED_BYTES + 4 * (n + k), fw.measured.position[k]);
    }
    send(FW_MSG_TELEMETRY, payload, (uint8_t)(TELEMETRY_FIXED_BYTES + 8u * n));
}

static float bounded(float value, float limit, int *implausible)
{
    if (!fw_float_is_finite(value)) {
        *implausible = 1;
        return 0.0f;
    }
    if (value > limit || value < -limit) {
        *implausible = 1;
        return value > 0 ? limit : -limit;
    }
    return value;
}

/* Read the encoders; a reading telemetry may not carry (not finite, beyond the "Telemetry values"
 * bounds) is a FAULT ENCODER while it lasts, and is reported clamped. */
static void read_encoders(void)
{
    int implausible = 0;
    uint8_t k;
    board_read_encoders(&fw.measured);
    for (k = 0; k < fw.config->channel_count; k++) {
        fw.measured.velocity[k] = bounded(fw.measured.velocity[k], FW_MAX_REPORTED_VELOCITY, &implausible);
        fw.measured.position[k] = bounded(fw.measured.position[k], FW_MAX_REPORTED_POSITION, &implausible);
    }
    if (implausible && !fw.sensor_fault) {
        fw.sensor_fault = FW_FAULT_ENCODER;
        stop_motors();
    } else if (!implausible && fw.sensor_fault) {
        fw.sensor_fault = FW_FAULT_NONE;
        stop_motors(); /* motors stay stopped until the next SetTargets */
    }
}

/* Step 7 of "Receiving": the rejection counter a structurally valid SetTargets falls into, or -1. */
static int set_targets_rejection(const fw_host_message_t *message)
{
    uint8_t k;
    if (message->channel_count != fw.config->channel_count)
        return FW_REJECTED_CHANNEL_COUNT;
    for (k = 0; k < message->channel_count; k++) {
        uint8_t kind = (message->position_mask >> k) & 1u ? FW_KIND_POSITION : FW_KIND_VELOCITY;
        if (!(fw.config->channels[k].kinds & kind))
            return FW_REJECTED_KIND;
    }
    for (k = 0; k < message->channel_count; k++) {
        float target = message->targets[k];
        const fw_channel_config_t *channel = &fw.config->channels[k];
        if (!fw_float_is_finite(target))
            return FW_REJECTED_RANGE;
        if ((message->position_mask >> k) & 1u) {
            if (!(target >= channel->position_min && target <= channel->position_max))
                return FW_REJECTED_RANGE;
        } else if (!(target >= -1.0f && target <= 1.0f)) {
            return FW_REJECTED_RANGE;
        }
    }
    return -1;
}

static void handle(const fw_host_message_t *message)
{
    switch (message->type) {
    case FW_MSG_SET_TARGETS: {
        int rejection = set_targets_rejection(message);
        if (rejection >= 0) {
            count((enum fw_rejection)rejection); /* not echoed, does not feed the watchdog */
            return;
        }
        fw.last_command_seq = message->seq;
        fw.last_valid_command_ms = board_millis();
        fw.watchdog_tripped = 0;
        if (fw.estop_latched) {
            count(FW_REJECTED_ESTOP);
        } else if (fault_code() != FW_FAULT_NONE) {
            count(FW_REJECTED_FAULT);
        } else {
            fw.outputs.position_mask = message->position_mask;
            memcpy(fw.outputs.target, message->targets, sizeof fw.outputs.target);
        }
        return;
    }
    case FW_MSG_EMERGENCY_STOP:
        fw.last_command_seq = message->seq;
        if (!fw.estop_latched) {
            fw.estop_latched = 1;
            stop_motors();
            board_set_outputs(&fw.outputs); /* at once, not at the next poll */
        }
        return;
    case FW_MSG_CLEAR_EMERGENCY_STOP:
        fw.last_command_seq = message->seq;
        fw.estop_latched = 0; /* the applied targets stay the stop targets until a SetTargets */
        return;
    case FW_MSG_GET_CAPABILITIES:
        fw.last_command_seq = message->seq;
        send_capabilities();
        return;
    default:
        count(FW_REJECTED_FRAMING); /* fw_rx_feed returns host types only; kept for safety */
        return;
    }
}

int fw_init(const fw_config_t *config)
{
    memset(&fw, 0, sizeof fw);
    fw_rx_init(&fw.rx);
    fw.config = config;
    fw.config_valid = (uint8_t)config_is_valid(config);
    if (!fw.config_valid) {
        board_set_outputs(&fw.outputs); /* zero channels, drivers disabled */
        return -1;
    }
    fw.outputs.channel_count = config->channel_count;
    fw.watchdog_tripped = 1; /* power-up behaves as if the watchdog had tripped */
    read_encoders();
    stop_motors();
    fw.outputs.enabled = fault_code() == FW_FAULT_NONE; /* an implausible encoder at power-up: FAULT */
    board_set_outputs(&fw.outputs);
    fw.next_telemetry_ms = board_millis();
    return 0;
}

void fw_rx_byte(uint8_t byte)
{
    fw_host_message_t message;
    enum fw_rejection reason = FW_REJECTED_FRAMING;
    fw_rx_result_t result;
    if (!fw.config_valid)
        return;
    result = fw_rx_feed(&fw.rx, byte, &message, &reason);
    if (result == FW_RX_REJECTED)
        count(reason);
    else if (result == FW_RX_MESSAGE)
        handle(&message);
}

void fw_poll(void)
{
    uint32_t now;
    if (!fw.config_valid)
        return;
    read_encoders();
    now = board_millis();
    /* "More than" on a 1 ms clock: never early (the last command may have come just before a tick), at
     * most one tick late. */
    if (!fw.watchdog_tripped && (uint32_t)(now - fw.last_valid_command_ms) > fw.config->watchdog_timeout_ms) {
        fw.watchdog_tripped = 1;
        stop_motors();
    }
    fw.outputs.enabled = fault_code() == FW_FAULT_NONE;
    board_set_outputs(&fw.outputs);
    if ((int32_t)(now - fw.next_telemetry_ms) >= 0) {
        send_telemetry(now);
        fw.next_telemetry_ms += fw.config->telemetry_period_ms;
        if ((int32_t)(now - fw.next_telemetry_ms) >= 0) /* overran: skip ahead, do not burst */
            fw.next_telemetry_ms = now + fw.config->telemetry_period_ms;
    }
}

void fw_set_fault(uint8_t code)
{
    if (code == FW_FAULT_NONE || code == fw.board_fault)
        return;
    fw.board_fault = code;
    stop_motors();
    fw.outputs.enabled = 0;
    board_set_outputs(&fw.outputs);
}

void fw_clear_fault(void)
{
    if (!fw.board_fault)
        return;
    fw.board_fault = FW_FAULT_NONE;
    stop_motors(); /* motors stay stopped until the next SetTargets */
}

void fw_get_state(fw_state_t *state)
{
    state->status = status_flags();
    state->fault_code = fault_code();
    state->last_command_seq = fw.last_command_seq;
    memcpy(state->rejected, fw.rejected, sizeof state->rejected);
    state->outputs = fw.outputs;
}
