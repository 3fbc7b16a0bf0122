/* Framing and host-message parsing of serial protocol v2; see fw_protocol.h and
 * docs/serial-protocol.md, sections 2 to 4. */
#include "fw_protocol.h"

#include <string.h>

typedef char fw_float_is_binary32[(sizeof(float) == 4) ? 1 : -1];

uint16_t fw_crc16_ccitt_false(const uint8_t *data, size_t length)
{
    uint16_t crc = 0xFFFFu;
    size_t i;
    for (i = 0; i < length; i++) {
        int bit;
        crc ^= (uint16_t)((uint16_t)data[i] << 8);
        for (bit = 0; bit < 8; bit++)
            crc = (crc & 0x8000u) ? (uint16_t)((crc << 1) ^ 0x1021u) : (uint16_t)(crc << 1);
    }
    return crc;
}

size_t fw_cobs_encode(const uint8_t *data, size_t length, uint8_t *out)
{
    size_t read = 0, write = 1, code_at = 0;
    uint8_t code = 1;
    while (read < length) {
        if (data[read] == 0) {
            out[code_at] = code;
            code = 1;
            code_at = write++;
        } else {
            out[write++] = data[read];
            if (++code == 0xFF) {
                out[code_at] = code;
                code = 1;
                code_at = write++;
            }
        }
        read++;
    }
    out[code_at] = code;
    return write;
}

int fw_cobs_decode(const uint8_t *data, size_t length, uint8_t *out, size_t capacity)
{
    size_t read = 0, write = 0;
    while (read < length) {
        uint8_t code = data[read++];
        uint8_t i;
        if (code == 0 || (size_t)(code - 1) > length - read)
            return -1; /* a zero inside a frame, or a block that runs past the end */
        for (i = 1; i < code; i++) {
            if (data[read] == 0 || write >= capacity)
                return -1;
            out[write++] = data[read++];
        }
        if (code != 0xFF && read < length) {
            if (write >= capacity)
                return -1;
            out[write++] = 0;
        }
    }
    return (int)write;
}

int fw_float_is_finite(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (bits & 0x7F800000u) != 0x7F800000u;
}

float fw_read_f32_le(const uint8_t *p)
{
    uint32_t bits = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

void fw_write_u16_le(uint8_t *p, uint16_t value)
{
    p[0] = (uint8_t)value;
    p[1] = (uint8_t)(value >> 8);
}

void fw_write_u32_le(uint8_t *p, uint32_t value)
{
    p[0] = (uint8_t)value;
    p[1] = (uint8_t)(value >> 8);
    p[2] = (uint8_t)(value >> 16);
    p[3] = (uint8_t)(value >> 24);
}

void fw_write_f32_le(uint8_t *p, float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    fw_write_u32_le(p, bits);
}

void fw_rx_init(fw_rx_t *rx)
{
    rx->length = 0;
    rx->discarding = 0;
}

static fw_rx_result_t reject(enum fw_rejection *reason, enum fw_rejection which)
{
    *reason = which;
    return FW_RX_REJECTED;
}

static fw_rx_result_t parse_payload(const uint8_t *payload, size_t length, fw_host_message_t *out,
                                    enum fw_rejection *reason)
{
    uint8_t k;
    switch (out->type) {
    case FW_MSG_EMERGENCY_STOP:
    case FW_MSG_CLEAR_EMERGENCY_STOP:
    case FW_MSG_GET_CAPABILITIES:
        return length == 0 ? FW_RX_MESSAGE : reject(reason, FW_REJECTED_FRAMING);
    case FW_MSG_SET_TARGETS:
        if (length < 2)
            return reject(reason, FW_REJECTED_FRAMING);
        out->channel_count = payload[0];
        out->position_mask = payload[1];
        if (out->channel_count < 1 || out->channel_count > FW_MAX_CHANNELS ||
            length != 2u + 4u * out->channel_count)
            return reject(reason, FW_REJECTED_FRAMING);
        if ((out->position_mask >> out->channel_count) != 0)
            return reject(reason, FW_REJECTED_FRAMING); /* marks channels beyond its count */
        for (k = 0; k < out->channel_count; k++)
            out->targets[k] = fw_read_f32_le(payload + 2 + 4 * k);
        return FW_RX_MESSAGE;
    default:
        /* Unknown types, and Telemetry or Capabilities travelling the wrong way (section 6a, 11). */
        return reject(reason, FW_REJECTED_FRAMING);
    }
}

fw_rx_result_t fw_parse_frame(const uint8_t *encoded, size_t length, fw_host_message_t *out,
                              enum fw_rejection *reason)
{
    uint8_t raw[FW_MAX_RAW_BYTES];
    int decoded;
    uint16_t received_crc;
    if (length == 0 || length > FW_MAX_ENCODED_BYTES)
        return reject(reason, FW_REJECTED_FRAMING);
    decoded = fw_cobs_decode(encoded, length, raw, sizeof raw);
    if (decoded < 0 || decoded < (int)(FW_HEADER_BYTES + FW_CRC_BYTES))
        return reject(reason, FW_REJECTED_FRAMING);
    received_crc = (uint16_t)(((uint16_t)raw[decoded - 2] << 8) | raw[decoded - 1]);
    if (fw_crc16_ccitt_false(raw, (size_t)decoded - FW_CRC_BYTES) != received_crc)
        return reject(reason, FW_REJECTED_CRC);
    if (raw[0] != FW_PROTOCOL_VERSION)
        return reject(reason, FW_REJECTED_FRAMING);
    memset(out, 0, sizeof *out);
    out->type = raw[1];
    out->seq = (uint16_t)(raw[2] | ((uint16_t)raw[3] << 8));
    return parse_payload(raw + FW_HEADER_BYTES, (size_t)decoded - FW_HEADER_BYTES - FW_CRC_BYTES, out, reason);
}

fw_rx_result_t fw_rx_feed(fw_rx_t *rx, uint8_t byte, fw_host_message_t *out, enum fw_rejection *reason)
{
    if (byte != 0) {
        if (rx->discarding)
            return FW_RX_PENDING;
        if (rx->length >= FW_MAX_ENCODED_BYTES) {
            /* Counted once, as it overflows; the rest of it is skipped up to the next delimiter. */
            rx->length = 0;
            rx->discarding = 1;
            return reject(reason, FW_REJECTED_FRAMING);
        }
        rx->buffer[rx->length++] = byte;
        return FW_RX_PENDING;
    }
    if (rx->discarding) {
        rx->discarding = 0;
        return FW_RX_PENDING;
    }
    if (rx->length == 0)
        return FW_RX_PENDING; /* a flushing delimiter */
    {
        uint8_t length = rx->length;
        rx->length = 0;
        return fw_parse_frame(rx->buffer, length, out, reason);
    }
}

size_t fw_seal(uint8_t type, uint16_t seq, const uint8_t *payload, size_t payload_length, uint8_t *out)
{
    uint8_t raw[FW_MAX_RAW_BYTES];
    size_t body, encoded;
    uint16_t crc;
    if (payload_length > FW_MAX_PAYLOAD_BYTES)
        return 0;
    raw[0] = FW_PROTOCOL_VERSION;
    raw[1] = type;
    fw_write_u16_le(raw + 2, seq);
    if (payload_length)
        memcpy(raw + FW_HEADER_BYTES, payload, payload_length);
    body = FW_HEADER_BYTES + payload_length;
    crc = fw_crc16_ccitt_false(raw, body);
    raw[body] = (uint8_t)(crc >> 8);
    raw[body + 1] = (uint8_t)crc;
    encoded = fw_cobs_encode(raw, body + FW_CRC_BYTES, out);
    out[encoded] = 0;
    return encoded + 1;
}
