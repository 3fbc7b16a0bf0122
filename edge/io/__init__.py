"""Devices: the camera, the serial protocol and the motor link.

Imports only the standard library, numpy, OpenCV, pyserial, cobs and `edge`'s shared modules (errors,
fileio, ratelimit, validation); never `edge.inference`, `edge.control` or `edge.service`.
"""
