// Reference motor-controller firmware (serial protocol v2) as an Arduino sketch for the Mega 2560.
//
// The protocol core and the ATmega2560 board layer are plain C, shared with `make -C firmware avr`;
// `make -C firmware arduino` copies them into this sketch's src/ folder, after which the Arduino IDE or
// arduino-cli builds the sketch (board "Arduino Mega or Mega 2560"). Pins and speeds: src/avr/board_config.h
// and docs/firmware.md. Do not use Serial, millis(), analogWrite() or attachInterrupt() here: the board
// layer owns UART0, Timer0, Timer1 and INT4/INT5.
extern "C" {
#include "src/core/fw_controller.h"
#include "src/avr/board_avr.h"
#include "src/avr/board_config.h"
}

void setup() {
  board_init();  // replaces the Arduino core's set-up of Timer0 and Timer1
  fw_init(&board_firmware_config);
}

void loop() {
  uint8_t byte;
  while (board_uart_read(&byte)) {
    fw_rx_byte(byte);
  }
  if (board_tick_elapsed()) {
    fw_poll();
  }
}
