/* ATmega2560 board layer: the fw_board.h functions plus the pieces main_avr.c needs. */
#ifndef BOARD_AVR_H
#define BOARD_AVR_H

#include <stdint.h>

/* UART0 at BAUD 8N1, Timer0 1 ms tick, Timer1 PWM, motor driver pins, encoder interrupts. */
void board_init(void);
/* 1 when a received byte was waiting (stored in *byte), 0 when none. */
uint8_t board_uart_read(uint8_t *byte);
/* 1 once per elapsed 1 ms tick since the last call (ticks missed while busy are merged). */
uint8_t board_tick_elapsed(void);
/* Sleep (idle mode) until the next interrupt, unless a byte or a tick is already waiting. */
void board_idle(void);

#endif
