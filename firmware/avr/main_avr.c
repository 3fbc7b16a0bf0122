/* Main loop of the reference firmware on the ATmega2560: bytes to the core as they arrive, fw_poll()
 * every 1 ms, idle sleep in between. The AVR's hardware watchdog resets the chip if the loop ever
 * hangs for 120 ms; after a reset the motors come up stopped (docs/serial-protocol.md, section 6). */
#include <avr/interrupt.h>
#include <avr/io.h>
#include <avr/wdt.h>

#include "../core/fw_controller.h"
#include "board_avr.h"
#include "board_config.h"

/* A watchdog reset leaves the watchdog running: turn it off before anything else (avr-libc's advice). */
void early_watchdog_off(void) __attribute__((naked, used, section(".init3")));
void early_watchdog_off(void)
{
    MCUSR = 0;
    wdt_disable();
}

int main(void)
{
    board_init();
    fw_init(&board_firmware_config); /* with a bad board_config.h it stays stopped and silent */
    wdt_enable(WDTO_120MS);
    sei();
    for (;;) {
        uint8_t byte;
        wdt_reset();
        while (board_uart_read(&byte))
            fw_rx_byte(byte);
        if (board_tick_elapsed())
            fw_poll();
        else
            board_idle();
    }
}
