"""Digital twin of the robot: simulated motor controller on a pty and a camera stream.

Demo and test infrastructure; the runtime only sees a serial path and a camera URL.
"""
