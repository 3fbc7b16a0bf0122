/* The host board: the core compiled for the build machine as a shared library, driven from tests.
 *
 * Time is set by the caller (host_set_millis), the UART is a byte buffer the caller drains
 * (host_take_tx), the outputs are recorded and the encoder readings are whatever the caller sets.
 * Nothing here models a motor; tests/firmware/ drive it through ctypes. */
#include <string.h>

#include "../core/fw_board.h"
#include "../core/fw_controller.h"

#define HOST_TX_CAPACITY 8192u

static uint8_t tx[HOST_TX_CAPACITY];
static size_t tx_length;
static uint32_t tx_overflowed;
static uint32_t now_ms;
static fw_outputs_t last_outputs;
static fw_measured_t measured;

void board_uart_write(const uint8_t *data, uint8_t length)
{
    if (tx_length + length > HOST_TX_CAPACITY) {
        tx_overflowed++; /* the test did not drain: it sees the count, never silently lost bytes */
        return;
    }
    memcpy(tx + tx_length, data, length);
    tx_length += length;
}

uint32_t board_millis(void) { return now_ms; }

void board_set_outputs(const fw_outputs_t *outputs) { last_outputs = *outputs; }

void board_read_encoders(fw_measured_t *out) { *out = measured; }

void host_set_millis(uint32_t ms) { now_ms = ms; }

size_t host_take_tx(uint8_t *out, size_t capacity)
{
    size_t n = tx_length < capacity ? tx_length : capacity;
    memcpy(out, tx, n);
    memmove(tx, tx + n, tx_length - n);
    tx_length -= n;
    return n;
}

uint32_t host_tx_overflows(void) { return tx_overflowed; }

void host_get_outputs(fw_outputs_t *out) { *out = last_outputs; }

void host_set_measured(uint8_t channel, float velocity, float position)
{
    if (channel < FW_MAX_CHANNELS) {
        measured.velocity[channel] = velocity;
        measured.position[channel] = position;
    }
}

void host_reset(void)
{
    tx_length = 0;
    tx_overflowed = 0;
    now_ms = 0;
    memset(&last_outputs, 0, sizeof last_outputs);
    memset(&measured, 0, sizeof measured);
}

size_t host_sizeof_config(void) { return sizeof(fw_config_t); }
size_t host_sizeof_outputs(void) { return sizeof(fw_outputs_t); }
size_t host_sizeof_state(void) { return sizeof(fw_state_t); }
