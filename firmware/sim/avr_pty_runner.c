/* The reference firmware's AVR image in simavr, with UART0 on a pty and the motors on stdout.
 *
 *   avr_pty_runner [-m MCU] [-f HZ] [--counts-per-s N] FIRMWARE.elf
 *
 * The emulated chip runs locked to the wall clock (it never runs ahead of real time; emulated time is
 * the chip's cycle count), so a host on the pty sees the firmware's timing. Lines on stdout, all times
 * in emulated microseconds since reset:
 *
 *   pty PATH                              the pty the host opens (printed once, first)
 *   rx T                                  a 0x00 frame delimiter from the host entered the UART (the
 *                                         firmware has it one byte time later, about 87 us at 115200)
 *   pwm T OCR1A OCR1B ICR1 PORTA          the motor outputs changed (PWM compare values, TOP, driver pins)
 *   lag T US                              the emulation fell behind the wall clock by US (once per second)
 *
 * A motor model closes the loop: each motor's speed follows its signed duty (PWM / TOP, sign from
 * IN1/IN2 on PORTA, zero while STBY is low) with a 50 ms lag, at --counts-per-s encoder counts per second
 * at full duty, and the runner toggles the encoder pins (A on PE4/PE5, B on PE3/PH3) accordingly.
 * Register addresses are the ATmega2560's data-space addresses (datasheet, "Register Summary"). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "avr_ioport.h"
#include "avr_uart.h"
#include "sim_avr.h"
#include "sim_elf.h"
#include "sim_time.h"

#define ADDR_PORTA 0x22
#define ADDR_ICR1L 0x86
#define ADDR_OCR1AL 0x88
#define ADDR_OCR1BL 0x8A
#define STBY_BIT 0x10
#define STEP_US 100u       /* motor model, encoder edges, UART input pacing */
#define INPUT_BYTES 4096u

static volatile sig_atomic_t stop_requested;
static int pty_leader = -1;
static avr_t *avr;
static avr_irq_t *uart_input;
static avr_uart_t *uart0;
static int uart_xoff;
static uint8_t input[INPUT_BYTES];
static size_t input_head, input_tail;
static double counts_per_s_full = 2292.0; /* 10 rad/s with 1440 counts per revolution */
static double speed[2];                  /* counts per second */
static double pending_counts[2];
static int encoder_a[2];
static avr_irq_t *pin_a[2], *pin_b[2];
static char last_pwm[96];

static void on_signal(int sig) { (void)sig; stop_requested = 1; }

static uint64_t emulated_us(void) { return avr->cycle * 1000000ull / avr->frequency; }

static double wall_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint16_t reg16(uint16_t low) { return (uint16_t)(avr->data[low] | (avr->data[low + 1] << 8)); }

static void on_uart_output(avr_irq_t *irq, uint32_t value, void *param)
{
    uint8_t byte = (uint8_t)value;
    (void)irq;
    (void)param;
    if (write(pty_leader, &byte, 1) != 1 && errno != EAGAIN)
        perror("pty write"); /* EAGAIN: nobody is reading the pty and its buffer is full: the byte is lost */
}

static void on_xon(avr_irq_t *irq, uint32_t value, void *param) { (void)irq; (void)value; (void)param; uart_xoff = 0; }
static void on_xoff(avr_irq_t *irq, uint32_t value, void *param) { (void)irq; (void)value; (void)param; uart_xoff = 1; }

static double signed_duty(int channel)
{
    uint8_t porta = avr->data[ADDR_PORTA];
    uint16_t top = reg16(ADDR_ICR1L);
    uint16_t compare = reg16(channel == 0 ? ADDR_OCR1AL : ADDR_OCR1BL);
    int in1 = (porta >> (2 * channel)) & 1, in2 = (porta >> (2 * channel + 1)) & 1;
    double duty;
    if (!(porta & STBY_BIT) || top == 0 || in1 == in2)
        return 0.0; /* drivers off, or brake / coast */
    duty = (double)compare / (double)top;
    if (duty > 1.0)
        duty = 1.0;
    return in1 ? duty : -duty;
}

static void report_pwm(void)
{
    char line[96];
    snprintf(line, sizeof line, "%u %u %u %u", reg16(ADDR_OCR1AL), reg16(ADDR_OCR1BL), reg16(ADDR_ICR1L),
             avr->data[ADDR_PORTA]);
    if (strcmp(line, last_pwm) != 0) {
        strcpy(last_pwm, line);
        printf("pwm %llu %s\n", (unsigned long long)emulated_us(), line);
    }
}

/* Every STEP_US of emulated time: outputs, motor model and encoder edges, one UART byte in. */
static avr_cycle_count_t step(avr_t *chip, avr_cycle_count_t when, void *param)
{
    const double dt = STEP_US / 1e6, lag = 1.0 - exp(-dt / 0.05);
    int k;
    (void)param;
    report_pwm();
    for (k = 0; k < 2; k++) {
        speed[k] += (signed_duty(k) * counts_per_s_full - speed[k]) * lag;
        pending_counts[k] += speed[k] * dt;
        if (pending_counts[k] >= 1.0 || pending_counts[k] <= -1.0) {
            int forward = pending_counts[k] > 0;
            /* B first, then the A edge: forward when A differs from B after the edge. */
            avr_raise_irq(pin_b[k], forward ? (uint32_t)encoder_a[k] : (uint32_t)!encoder_a[k]);
            encoder_a[k] = !encoder_a[k];
            avr_raise_irq(pin_a[k], (uint32_t)encoder_a[k]);
            pending_counts[k] += forward ? -1.0 : 1.0;
        }
    }
    /* One byte at a time, into an empty receive FIFO: a byte reaches the firmware one byte time after it
     * is logged, never later behind a backlog (the 100 us pacing is about one byte time at 115200 baud). */
    if (!uart_xoff && input_tail != input_head && uart0->input.read == uart0->input.write) {
        uint8_t byte = input[input_tail];
        input_tail = (input_tail + 1) % INPUT_BYTES;
        if (byte == 0)
            printf("rx %llu\n", (unsigned long long)emulated_us());
        avr_raise_irq(uart_input, byte);
    }
    return when + avr_usec_to_cycles(chip, STEP_US);
}

static void read_pty(void)
{
    uint8_t chunk[256];
    ssize_t n = read(pty_leader, chunk, sizeof chunk);
    ssize_t i;
    for (i = 0; i < n; i++) {
        size_t next = (input_head + 1) % INPUT_BYTES;
        if (next == input_tail)
            break; /* the host sends faster than the line carries: drop, as a UART would */
        input[input_head] = chunk[i];
        input_head = next;
    }
}

/* simavr's default sleep callback sleeps for the emulated sleep time on top of the time spent emulating;
 * the main loop keeps the emulation on the wall clock instead. */
static void no_sleep(avr_t *chip, avr_cycle_count_t how_long) { (void)chip; (void)how_long; }

static int open_pty(char *name, size_t name_size)
{
    struct termios raw;
    int follower;
    pty_leader = posix_openpt(O_RDWR | O_NOCTTY);
    if (pty_leader < 0 || grantpt(pty_leader) || unlockpt(pty_leader) || ptsname_r(pty_leader, name, name_size))
        return -1;
    /* Hold the follower open in raw mode: no echo of the firmware's telemetry back into its own UART
     * before the host opens the port, and no EIO on the leader between host opens. */
    follower = open(name, O_RDWR | O_NOCTTY);
    if (follower < 0 || tcgetattr(follower, &raw))
        return -1;
    cfmakeraw(&raw);
    if (tcsetattr(follower, TCSANOW, &raw))
        return -1;
    return fcntl(pty_leader, F_SETFL, O_NONBLOCK);
}

int main(int argc, char **argv)
{
    const char *mcu = "atmega2560", *path = NULL;
    unsigned long frequency = 16000000ul;
    elf_firmware_t firmware;
    char name[128];
    double start, last_lag_report = 0.0;
    avr_cycle_count_t next_check = 0;
    uint32_t flags = 0;
    int i;
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc)
            mcu = argv[++i];
        else if (!strcmp(argv[i], "-f") && i + 1 < argc)
            frequency = strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--counts-per-s") && i + 1 < argc)
            counts_per_s_full = atof(argv[++i]);
        else
            path = argv[i];
    }
    if (!path) {
        fprintf(stderr, "usage: %s [-m MCU] [-f HZ] [--counts-per-s N] FIRMWARE.elf\n", argv[0]);
        return 2;
    }
    memset(&firmware, 0, sizeof firmware);
    if (elf_read_firmware(path, &firmware)) {
        fprintf(stderr, "cannot read the firmware %s (build it with: make -C firmware avr)\n", path);
        return 1;
    }
    avr = avr_make_mcu_by_name(mcu);
    if (!avr) {
        fprintf(stderr, "simavr does not know the MCU %s\n", mcu);
        return 1;
    }
    avr_init(avr);
    avr->frequency = (uint32_t)frequency;
    avr->sleep = no_sleep;
    avr->log = LOG_ERROR;
    avr_load_firmware(avr, &firmware);

    avr_ioctl(avr, AVR_IOCTL_UART_GET_FLAGS('0'), &flags);
    flags &= ~(uint32_t)(AVR_UART_FLAG_STDIO | AVR_UART_FLAG_POLL_SLEEP);
    avr_ioctl(avr, AVR_IOCTL_UART_SET_FLAGS('0'), &flags);
    for (avr_io_t *io = avr->io_port; io; io = io->next)
        if (io->irq_ioctl_get == AVR_IOCTL_UART_GETIRQ('0'))
            uart0 = (avr_uart_t *)io;
    if (!uart0) {
        fprintf(stderr, "simavr's %s has no UART0\n", mcu);
        return 1;
    }
    uart_input = avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_INPUT);
    avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUTPUT), on_uart_output, NULL);
    avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUT_XON), on_xon, NULL);
    avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUT_XOFF), on_xoff, NULL);
    pin_a[0] = avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('E'), 4);
    pin_b[0] = avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('E'), 3);
    pin_a[1] = avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('E'), 5);
    pin_b[1] = avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('H'), 3);
    for (i = 0; i < 2; i++) {
        avr_raise_irq(pin_a[i], 0);
        avr_raise_irq(pin_b[i], 0);
    }

    if (open_pty(name, sizeof name)) {
        perror("cannot open a pty");
        return 1;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("pty %s\n", name);
    fprintf(stderr, "UART0: %llu cycles per byte\n", (unsigned long long)uart0->cycles_per_byte);
    avr_cycle_timer_register_usec(avr, STEP_US, step, NULL);

    start = wall_s();
    while (!stop_requested) {
        int state = avr_run(avr);
        if (state == cpu_Done || state == cpu_Crashed) {
            fprintf(stderr, "the firmware stopped (simavr state %d) at %llu us\n", state,
                    (unsigned long long)emulated_us());
            return 1;
        }
        if (avr->cycle >= next_check) { /* every 0.5 ms of emulated time */
            next_check = avr->cycle + avr_usec_to_cycles(avr, 500);
            double ahead;
            read_pty();
            ahead = (double)emulated_us() / 1e6 - (wall_s() - start);
            if (ahead > 0.0005) {
                struct timespec ts = {0, (long)(ahead * 1e9)};
                nanosleep(&ts, NULL);
            } else if (ahead < -0.05 && wall_s() - last_lag_report > 1.0) {
                last_lag_report = wall_s();
                printf("lag %llu %.0f\n", (unsigned long long)emulated_us(), -ahead * 1e6);
            }
        }
    }
    return 0;
}
