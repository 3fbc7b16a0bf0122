// What the Arduino core's main() does around a sketch, reduced to what this sketch uses: interrupts on,
// setup() once, loop() forever. `make arduino` links the sketch with it to check that the sketch and its
// src/ folder compile and link for the ATmega2560 without the Arduino IDE.
#include <avr/interrupt.h>

void setup();
void loop();

int main() {
  sei();
  setup();
  for (;;) {
    loop();
  }
}
