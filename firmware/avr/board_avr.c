/* ATmega2560 board layer (Arduino Mega 2560): UART0, a 1 ms timer, PWM for two motors and quadrature
 * encoders on external interrupts. Pin assignment: docs/firmware.md, "Wiring".
 *
 *   UART0       RXD0 PE0 (D0), TXD0 PE1 (D1): the USB serial port of the Mega
 *   PWM         OC1A PB5 (D11) motor 0, OC1B PB6 (D12) motor 1; Timer1 fast PWM, TOP = ICR1
 *   direction   PA0/PA1 (D22/D23) motor 0 IN1/IN2, PA2/PA3 (D24/D25) motor 1 IN1/IN2
 *   enable      PA4 (D26) driver STBY, high = drivers on
 *   encoders    motor 0 A on INT4 PE4 (D2), B on PE3 (D5); motor 1 A on INT5 PE5 (D3), B on PH3 (D6)
 *
 * Interrupts only move bytes, count ticks and count encoder edges; everything else runs in the main
 * loop, so the core never runs inside an interrupt. */
#include <avr/interrupt.h>
#include <avr/io.h>
#include <avr/sleep.h>
#include <util/atomic.h>

#include "../core/fw_board.h"
#include "board_avr.h"
#include "board_config.h"

#ifndef BAUD
#define BAUD 115200UL
#endif

#define RX_RING 128u /* > one largest frame (96 bytes) */
#define TX_RING 256u /* > one Capabilities and one Telemetry frame */
#define TWO_PI 6.2831853f

const fw_config_t board_firmware_config = {
    BOARD_CHANNELS, BOARD_WATCHDOG_TIMEOUT_MS, BOARD_TELEMETRY_PERIOD_MS,
    {{BOARD_CHANNEL0_KINDS, BOARD_POSITION_MIN, BOARD_POSITION_MAX},
     {BOARD_CHANNEL1_KINDS, BOARD_POSITION_MIN, BOARD_POSITION_MAX}},
};

static volatile uint8_t rx_ring[RX_RING];
static volatile uint8_t rx_head, rx_tail;
static volatile uint8_t tx_ring[TX_RING];
static volatile uint8_t tx_head, tx_tail;
static volatile uint32_t millis_count;
static volatile uint8_t tick_pending;
static volatile int32_t encoder_count[2];

static int32_t window_start_count[2];
static uint32_t window_start_ms;
static float velocity_estimate[2];

ISR(USART0_RX_vect)
{
    uint8_t byte = UDR0;
    uint8_t next = (uint8_t)((rx_head + 1u) % RX_RING);
    if (next != rx_tail) { /* full: the byte is lost, and the frame it belonged to fails its CRC */
        rx_ring[rx_head] = byte;
        rx_head = next;
    }
}

ISR(USART0_UDRE_vect)
{
    if (tx_tail == tx_head) {
        UCSR0B &= (uint8_t)~_BV(UDRIE0);
        return;
    }
    UDR0 = tx_ring[tx_tail];
    tx_tail = (uint8_t)((tx_tail + 1u) % TX_RING);
}

ISR(TIMER0_COMPA_vect)
{
    millis_count++;
    tick_pending = 1;
}

/* 2x quadrature decoding: on every edge of A, B says the direction. */
ISR(INT4_vect)
{
    uint8_t a = (PINE >> PE4) & 1u, b = (PINE >> PE3) & 1u;
    encoder_count[0] += (a != b) ? 1 : -1;
}

ISR(INT5_vect)
{
    uint8_t a = (PINE >> PE5) & 1u, b = (PINH >> PH3) & 1u;
    encoder_count[1] += (a != b) ? 1 : -1;
}

void board_init(void)
{
    /* UART0, double speed: UBRR = F_CPU / (8 * BAUD) - 1, rounded. */
    uint16_t ubrr = (uint16_t)((F_CPU + 4UL * BAUD) / (8UL * BAUD) - 1UL);
    UBRR0H = (uint8_t)(ubrr >> 8);
    UBRR0L = (uint8_t)ubrr;
    UCSR0A = _BV(U2X0);
    UCSR0C = _BV(UCSZ01) | _BV(UCSZ00); /* 8N1 */
    UCSR0B = _BV(RXEN0) | _BV(TXEN0) | _BV(RXCIE0);

    /* Timer0: CTC, 16 MHz / 64 / 250 = 1 kHz. */
    TCCR0A = _BV(WGM01);
    TCCR0B = _BV(CS01) | _BV(CS00);
    OCR0A = (uint8_t)(F_CPU / 64UL / 1000UL - 1UL);
    TIMSK0 = _BV(OCIE0A);

    /* Timer1: fast PWM mode 14 (TOP = ICR1), non-inverting on OC1A and OC1B, no prescaler. */
    ICR1 = BOARD_PWM_TOP;
    OCR1A = 0;
    OCR1B = 0;
    TCCR1A = _BV(COM1A1) | _BV(COM1B1) | _BV(WGM11);
    TCCR1B = _BV(WGM13) | _BV(WGM12) | _BV(CS10);
    DDRB |= _BV(PB5) | _BV(PB6);

    /* Driver pins: IN1/IN2 of both motors and STBY, all low (coast, drivers off) until the core runs. */
    PORTA &= (uint8_t)~0x1Fu;
    DDRA |= 0x1Fu;

    /* Encoders: inputs with pull-ups; INT4 and INT5 on any edge. */
    DDRE &= (uint8_t)~(_BV(PE3) | _BV(PE4) | _BV(PE5));
    PORTE |= _BV(PE3) | _BV(PE4) | _BV(PE5);
    DDRH &= (uint8_t)~_BV(PH3);
    PORTH |= _BV(PH3);
    EICRB = _BV(ISC40) | _BV(ISC50);
    EIFR = _BV(INTF4) | _BV(INTF5);
    EIMSK |= _BV(INT4) | _BV(INT5);
}

uint8_t board_uart_read(uint8_t *byte)
{
    uint8_t got = 0;
    ATOMIC_BLOCK(ATOMIC_RESTORESTATE) {
        if (rx_tail != rx_head) {
            *byte = rx_ring[rx_tail];
            rx_tail = (uint8_t)((rx_tail + 1u) % RX_RING);
            got = 1;
        }
    }
    return got;
}

void board_uart_write(const uint8_t *data, uint8_t length)
{
    uint8_t i;
    for (i = 0; i < length; i++) {
        uint8_t next = (uint8_t)((tx_head + 1u) % TX_RING);
        while (next == tx_tail) {
            /* full: wait for the UDRE interrupt to make room (interrupts are on in the main loop) */
        }
        tx_ring[tx_head] = data[i];
        ATOMIC_BLOCK(ATOMIC_RESTORESTATE) {
            tx_head = next;
            UCSR0B |= _BV(UDRIE0);
        }
    }
}

uint32_t board_millis(void)
{
    uint32_t now;
    ATOMIC_BLOCK(ATOMIC_RESTORESTATE) { now = millis_count; }
    return now;
}

uint8_t board_tick_elapsed(void)
{
    uint8_t pending;
    ATOMIC_BLOCK(ATOMIC_RESTORESTATE) {
        pending = tick_pending;
        tick_pending = 0;
    }
    return pending;
}

void board_idle(void)
{
    SMCR = (uint8_t)(SMCR & ~(_BV(SM2) | _BV(SM1) | _BV(SM0))); /* idle: timers and UART keep running */
    cli();
    if (rx_tail == rx_head && !tick_pending) {
        sleep_enable();
        sei(); /* the instruction after SEI runs before any interrupt: no wake-up is lost */
        sleep_cpu();
        sleep_disable();
    }
    sei();
}

static int32_t encoder(uint8_t channel)
{
    int32_t count;
    ATOMIC_BLOCK(ATOMIC_RESTORESTATE) { count = encoder_count[channel]; }
    return count;
}

void board_read_encoders(fw_measured_t *measured)
{
    const float rad_per_count = TWO_PI / BOARD_COUNTS_PER_REV;
    uint32_t now = board_millis();
    uint32_t elapsed = now - window_start_ms;
    uint8_t k;
    for (k = 0; k < BOARD_CHANNELS; k++) {
        int32_t count = encoder(k);
        if (elapsed >= BOARD_VELOCITY_WINDOW_MS) {
            float rad_s = (float)(count - window_start_count[k]) * rad_per_count * 1000.0f / (float)elapsed;
            velocity_estimate[k] = rad_s / BOARD_MAX_SPEED_RAD_S;
            window_start_count[k] = count;
        }
        measured->velocity[k] = velocity_estimate[k];
        measured->position[k] = (float)count * rad_per_count;
    }
    if (elapsed >= BOARD_VELOCITY_WINDOW_MS)
        window_start_ms = now;
}

static float clamp_unit(float x)
{
    return x > 1.0f ? 1.0f : (x < -1.0f ? -1.0f : x);
}

/* One motor: |duty| on its PWM pin, the sign on IN1/IN2; zero duty brakes (IN1 = IN2 = 1). */
static void drive(uint8_t channel, float duty)
{
    uint8_t in1 = (uint8_t)_BV(2 * channel), in2 = (uint8_t)_BV(2 * channel + 1);
    uint16_t compare = (uint16_t)((duty < 0 ? -duty : duty) * (float)BOARD_PWM_TOP + 0.5f);
    uint8_t port = PORTA & (uint8_t)~(in1 | in2);
    if (duty > 0.0f)
        port |= in1;
    else if (duty < 0.0f)
        port |= in2;
    else
        port |= in1 | in2;
    PORTA = port;
    if (channel == 0)
        OCR1A = compare;
    else
        OCR1B = compare;
}

void board_set_outputs(const fw_outputs_t *outputs)
{
    uint8_t k;
    if (!outputs->enabled) {
        OCR1A = 0;
        OCR1B = 0;
        PORTA &= (uint8_t)~0x1Fu; /* coast, STBY low: drivers off */
        return;
    }
    PORTA |= _BV(PA4);
    for (k = 0; k < BOARD_CHANNELS && k < outputs->channel_count; k++) {
        float duty;
        if ((outputs->position_mask >> k) & 1u) {
            float position = (float)encoder(k) * (TWO_PI / BOARD_COUNTS_PER_REV);
            duty = clamp_unit(BOARD_POSITION_GAIN * (outputs->target[k] - position));
        } else {
            duty = clamp_unit(outputs->target[k]); /* open loop: duty proportional to the speed asked */
        }
        drive(k, duty);
    }
}
