/* Serial protocol v2 (docs/serial-protocol.md): framing, CRC, COBS and the host's messages.
 *
 * Portable C99, no dynamic allocation, no I/O. The streaming receiver (fw_rx_*) turns bytes into
 * validated host messages and says, for a dropped frame, which rejection counter it belongs to;
 * fw_seal builds a wire frame. The controller's behaviour (section 6) is fw_controller.c. */
#ifndef FW_PROTOCOL_H
#define FW_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>

#define FW_PROTOCOL_VERSION 2u
#define FW_PROTOCOL_MINOR 0u
#define FW_MAX_CHANNELS 8u
#define FW_HEADER_BYTES 4u
#define FW_CRC_BYTES 2u
#define FW_MAX_RAW_BYTES 94u     /* largest body + CRC: Telemetry with 8 velocities and 8 positions */
#define FW_MAX_ENCODED_BYTES 95u /* largest COBS-encoded frame, without the delimiter */
#define FW_MAX_FRAME_BYTES 96u   /* with the 0x00 delimiter */
#define FW_MAX_PAYLOAD_BYTES (FW_MAX_RAW_BYTES - FW_HEADER_BYTES - FW_CRC_BYTES)

enum fw_message_type {
    FW_MSG_SET_TARGETS = 0x01,
    FW_MSG_EMERGENCY_STOP = 0x02,
    FW_MSG_CLEAR_EMERGENCY_STOP = 0x03,
    FW_MSG_GET_CAPABILITIES = 0x04,
    FW_MSG_TELEMETRY = 0x81,
    FW_MSG_CAPABILITIES = 0x82
};

enum fw_kind_bits { FW_KIND_VELOCITY = 0x01, FW_KIND_POSITION = 0x02 };

enum fw_status_flags {
    FW_STATUS_WATCHDOG_TRIPPED = 0x01,
    FW_STATUS_ESTOP_LATCHED = 0x02,
    FW_STATUS_FAULT = 0x04,
    FW_STATUS_MOTORS_ENABLED = 0x08
};

enum fw_fault_code {
    FW_FAULT_NONE = 0x00,
    FW_FAULT_DRIVER = 0x01,
    FW_FAULT_OVER_CURRENT = 0x02,
    FW_FAULT_OVER_TEMPERATURE = 0x03,
    FW_FAULT_UNDER_VOLTAGE = 0x04,
    FW_FAULT_ENCODER = 0x05,
    FW_FAULT_POSITION_LIMIT = 0x06,
    FW_FAULT_FOLLOWING_ERROR = 0x07,
    FW_FAULT_INTERNAL = 0x08
};

/* Telemetry's rejection counters, in their wire order. */
enum fw_rejection {
    FW_REJECTED_CRC = 0,
    FW_REJECTED_FRAMING,
    FW_REJECTED_CHANNEL_COUNT,
    FW_REJECTED_KIND,
    FW_REJECTED_RANGE,
    FW_REJECTED_ESTOP,
    FW_REJECTED_FAULT,
    FW_REJECTION_COUNT
};

/* One host message that passed steps 1-6 of "Receiving" and the structural checks of its payload.
 * SetTargets' channel count, kinds and ranges (step 7) are the controller's to check. */
typedef struct {
    uint8_t type;
    uint16_t seq;
    uint8_t channel_count;  /* SetTargets only: 1..FW_MAX_CHANNELS */
    uint8_t position_mask;  /* SetTargets only: no bit at or above channel_count */
    float targets[FW_MAX_CHANNELS];
} fw_host_message_t;

typedef enum {
    FW_RX_PENDING = 0, /* byte consumed, no frame completed */
    FW_RX_MESSAGE,     /* a host message is in *out */
    FW_RX_REJECTED     /* a frame was dropped; *reason says which counter */
} fw_rx_result_t;

typedef struct {
    uint8_t buffer[FW_MAX_ENCODED_BYTES];
    uint8_t length;
    uint8_t discarding; /* inside an oversized frame: skip to the next 0x00 */
} fw_rx_t;

uint16_t fw_crc16_ccitt_false(const uint8_t *data, size_t length);

/* COBS-encode `length` bytes (at most 254 * 255) into `out`; returns the encoded length (no delimiter). */
size_t fw_cobs_encode(const uint8_t *data, size_t length, uint8_t *out);
/* COBS-decode; returns the decoded length, or -1 when the encoding is invalid or would exceed `capacity`. */
int fw_cobs_decode(const uint8_t *data, size_t length, uint8_t *out, size_t capacity);

void fw_rx_init(fw_rx_t *rx);
fw_rx_result_t fw_rx_feed(fw_rx_t *rx, uint8_t byte, fw_host_message_t *out, enum fw_rejection *reason);
/* Validate one frame given without its delimiter (steps 1-6 and the payload's structure). */
fw_rx_result_t fw_parse_frame(const uint8_t *encoded, size_t length, fw_host_message_t *out,
                              enum fw_rejection *reason);

/* Build the wire frame of one payload (header, CRC big-endian, COBS, 0x00) into `out`, which holds
 * FW_MAX_FRAME_BYTES; returns its length, or 0 when the payload is longer than FW_MAX_PAYLOAD_BYTES. */
size_t fw_seal(uint8_t type, uint16_t seq, const uint8_t *payload, size_t payload_length, uint8_t *out);

/* Little-endian field helpers shared with the controller. */
int fw_float_is_finite(float value);
float fw_read_f32_le(const uint8_t *p);
void fw_write_f32_le(uint8_t *p, float value);
void fw_write_u16_le(uint8_t *p, uint16_t value);
void fw_write_u32_le(uint8_t *p, uint32_t value);

#endif
