"""The control loop's commands from other threads (the control socket, signal handlers): instruction,
stop, resume, e-stop and its clear. Each only sets a field under a lock and amends the published
status, so none of them waits on a tick (edge/control/loop.py mixes this class into ControlLoop).

Holds. An e-stop clear never restarts motion: the robot holds until `resume()` or a new instruction.
A policy without language takes no instruction: `set_instruction(text)` is refused, `stop` (None) holds
the robot until `resume()`.
"""

from __future__ import annotations

import logging

from edge.errors import InputError
from edge.io.protocol import WATCHDOG_TIMEOUT_S

logger = logging.getLogger("edge.control.loop")

HOLD_AFTER_ESTOP = "emergency stop: holding until `vla-edge resume` or a new instruction"
STOPPED_HOLD = "stopped by `vla-edge stop`: holding until `vla-edge resume`"
# The controller must show ESTOP_LATCHED within this long after our EmergencyStop (its own watchdog
# bound); the frame is repeated every tick until it does (docs/serial-protocol.md, section 6).
ESTOP_CONFIRM_S = WATCHDOG_TIMEOUT_S


class OperatorCommands:
    """Mixed into ControlLoop: uses its safety layer, link, pipeline, shape, locks and status."""

    def set_instruction(self, text: str | None) -> None:
        """Raises InputError (and keeps the current instruction) if the tokenizer cannot take `text`, or
        while the emergency stop is latched (a new instruction must not arm motion then). A new
        instruction is an explicit request to move: it also ends a hold after an e-stop clear."""
        text = text.strip() if text else None
        if not self.shape.needs_language:
            self._language_free_instruction(text)
            return
        if text is not None:
            if self.safety.estopped:
                raise InputError("the emergency stop is latched: the instruction was not taken and the robot "
                                 "stays stopped; release it with `vla-edge clear`, then send the instruction")
            self.pipeline.tokenizer.encode(text)  # refuse here, before the robot drops what it is doing
        with self._instruction_lock:
            self._instruction = text
            self.gate.new_task()  # the failure monitor's time on task starts again
            if text is not None and self._controller_fault is None:
                self._release_hold("new instruction")
        self._amend_status(instruction=text, hold_reason=self._hold_reason)
        logger.info("instruction set: %r", text)

    def _language_free_instruction(self, text: str | None) -> None:
        """A policy without language runs without an instruction: `say` is refused; `stop` (None) holds
        the robot until `vla-edge resume`, as after an e-stop clear."""
        if text is not None:
            raise InputError(f"the policy {self.shape.name!r} takes no instruction (its bundle has no language "
                             "input): it runs without one. Use `vla-edge stop` to hold the robot and "
                             "`vla-edge resume` to run the policy again")
        with self._instruction_lock:
            self._hold_reason = STOPPED_HOLD
        self._amend_status(hold_reason=STOPPED_HOLD)
        logger.info("stopped: holding until `vla-edge resume`")

    def resume(self) -> None:
        """End the hold that follows an e-stop clear: motion resumes on the current instruction, slewing up
        from zero. InputError while the e-stop is latched or when there is no hold to end."""
        if self.safety.estopped:
            raise InputError("the emergency stop is latched: release it with `vla-edge clear` first")
        if self._controller_fault is not None:
            raise InputError(f"{self._controller_fault}: the robot holds until the controller is healthy; check "
                             "its power, cable and `vla-edge status`, then resume")
        with self._instruction_lock:
            if self._hold_reason is None:
                if self.gate.task_overdue:  # stopped in fallback by time on task: the operator says go on
                    self.gate.new_task()
                    logger.info("time on task restarted by resume: the policy runs on the current instruction")
                    return
                raise InputError("nothing to resume: the robot is not held after an emergency stop or a stop, "
                                 "and no task ran out of time")
            self.gate.new_task()
            self._release_hold("resume")
        self._amend_status(hold_reason=None)

    def _grounded(self, text: str, embedding):
        """The embedding, or None (a hold) while the failure monitor finds the instruction not understood."""
        if embedding is None:
            return None
        reason = self.gate.instruction_hold(text, embedding)
        if reason is None:
            return embedding
        if self._hold_reason != reason:
            self._warn("%s: holding", reason)
            with self._instruction_lock:
                self._hold_reason = reason
            self._amend_status(hold_reason=reason)
        return None

    def _release_hold(self, why: str) -> None:
        if self._hold_reason is not None:
            logger.info("hold (%s) ended by %s: commands slew up from zero", self._hold_reason, why)
        self._hold_reason = None

    @property
    def instruction(self) -> str | None:
        return self._instruction

    def emergency_stop(self) -> None:
        with self._instruction_lock:
            self._hold_reason = HOLD_AFTER_ESTOP
        self.safety.estop()
        self._estop_confirmed = False
        self._estop_since_s = self.clock()
        self._estop_sent = self.link.emergency_stop()
        self._amend_status(mode="estop", estop=True, hold_reason=HOLD_AFTER_ESTOP)
        logger.warning("emergency stop latched")

    def _repeat_estop(self, now: float) -> None:
        """While our e-stop is latched and the controller does not show it (lost frame, controller reset),
        send EmergencyStop again, once per tick."""
        if self._estop_confirmed:
            return
        if now - self._estop_since_s > ESTOP_CONFIRM_S:
            self._warn("the controller has not confirmed the emergency stop after %.2f s (no ESTOP_LATCHED echo); "
                       "repeating it, commands stay zero", now - self._estop_since_s)
        self._estop_sent = self.link.emergency_stop()
        self.counters["estop_resends"] += 1

    def clear_emergency_stop(self) -> None:
        """Release the latch; the robot then HOLDS (an e-stop clear never restarts motion, as in industrial
        practice): motion resumes only on `resume()` or a new instruction."""
        with self._instruction_lock:
            if self.safety.estopped:
                self._hold_reason = HOLD_AFTER_ESTOP
        self.safety.clear_estop()
        self.link.clear_emergency_stop()
        self._amend_status(estop=False, hold_reason=self._hold_reason)
        logger.info("emergency stop cleared; holding until `vla-edge resume` or a new instruction")
