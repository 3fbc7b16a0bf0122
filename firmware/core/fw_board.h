/* The board interface: the four things the portable core needs from a board layer.
 *
 * A board layer (firmware/avr/board_avr.c, firmware/host/board_host.c) implements these functions;
 * the core calls them from fw_poll() and fw_rx_byte(), never from an interrupt. Values cross in the
 * protocol's units: a velocity normalised to [-1, 1] (1 = the channel's maximum speed), a position in
 * the channel's unit. docs/firmware.md, "Porting the board layer", says what each must do. */
#ifndef FW_BOARD_H
#define FW_BOARD_H

#include <stdint.h>

#include "fw_protocol.h"

typedef struct {
    uint8_t channel_count;
    /* 0: every driver disabled (outputs off, FAULT); 1: drive each channel towards its target. */
    uint8_t enabled;
    uint8_t position_mask; /* bit k set: target[k] is a position, else a normalised velocity */
    float target[FW_MAX_CHANNELS];
} fw_outputs_t;

typedef struct {
    float velocity[FW_MAX_CHANNELS]; /* measured, normalised like a velocity target */
    float position[FW_MAX_CHANNELS]; /* measured, in the channel's unit */
} fw_measured_t;

/* Queue bytes for the UART; may block until there is room, never drops them. */
void board_uart_write(const uint8_t *data, uint8_t length);
/* Milliseconds since boot, monotonic, wrapping at 2^32. */
uint32_t board_millis(void);
/* Drive the motors; called at every fw_poll() with the applied targets. */
void board_set_outputs(const fw_outputs_t *outputs);
/* Measured velocity and position of every channel, from the encoders. */
void board_read_encoders(fw_measured_t *measured);

#endif
