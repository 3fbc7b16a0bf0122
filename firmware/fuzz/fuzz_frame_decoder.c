/* libFuzzer harness: arbitrary bytes through the frame receiver and, byte by byte, the whole controller.
 *
 * Checks, beyond the sanitizers: every completed frame yields exactly one verdict; an accepted
 * message has the structure fw_protocol.h promises; a frame sealed from the accepted message's
 * fields decodes back to the same message (the encoder and decoder agree). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../core/fw_controller.h"
#include "../core/fw_protocol.h"

static uint32_t now_ms;
uint32_t board_millis(void) { return now_ms; }
void board_uart_write(const uint8_t *data, uint8_t length)
{
    if (length == 0 || length > FW_MAX_FRAME_BYTES || data[length - 1] != 0)
        abort(); /* every frame the controller emits is one whole frame */
}
void board_set_outputs(const fw_outputs_t *outputs) { (void)outputs; }
void board_read_encoders(fw_measured_t *measured) { memset(measured, 0, sizeof *measured); }

static const fw_config_t config = {
    2, 300, 20,
    {{FW_KIND_VELOCITY, 0.0f, 0.0f}, {FW_KIND_VELOCITY | FW_KIND_POSITION, -3.0f, 3.0f}},
};

static void check_round_trip(const fw_host_message_t *message)
{
    uint8_t payload[2 + 4 * FW_MAX_CHANNELS], frame[FW_MAX_FRAME_BYTES];
    size_t length = 0, frame_length, k;
    fw_host_message_t again;
    enum fw_rejection reason;
    if (message->type == FW_MSG_SET_TARGETS) {
        if (message->channel_count < 1 || message->channel_count > FW_MAX_CHANNELS ||
            (message->position_mask >> message->channel_count) != 0)
            abort();
        payload[0] = message->channel_count;
        payload[1] = message->position_mask;
        for (k = 0; k < message->channel_count; k++)
            fw_write_f32_le(payload + 2 + 4 * k, message->targets[k]);
        length = 2 + 4 * message->channel_count;
    }
    frame_length = fw_seal(message->type, message->seq, payload, length, frame);
    if (frame_length < 2 || fw_parse_frame(frame, frame_length - 1, &again, &reason) != FW_RX_MESSAGE)
        abort();
    if (memcmp(&again, message, sizeof again) != 0)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fw_rx_t rx;
    fw_host_message_t message;
    enum fw_rejection reason;
    size_t i;
    fw_rx_init(&rx);
    for (i = 0; i < size; i++) {
        fw_rx_result_t result;
        reason = FW_REJECTION_COUNT;
        result = fw_rx_feed(&rx, data[i], &message, &reason);
        if (result == FW_RX_REJECTED && reason >= FW_REJECTION_COUNT)
            abort();
        if (result == FW_RX_MESSAGE)
            check_round_trip(&message);
        if (rx.length > FW_MAX_ENCODED_BYTES)
            abort();
    }
    /* The same bytes through the controller: state machine, replies and counters under the sanitizers. */
    now_ms = 0;
    if (fw_init(&config) != 0)
        abort();
    for (i = 0; i < size; i++) {
        fw_rx_byte(data[i]);
        if ((i & 7u) == 0) {
            now_ms += 7;
            fw_poll();
        }
    }
    return 0;
}
