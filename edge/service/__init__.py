"""The robot service: config, wiring (bundle + config -> components), run, doctor, the control-socket
server, sd_notify and the metrics endpoint. The only layer that imports io, inference and control
together; `edge.service.wiring` is the one place that builds the system from a bundle and a config.
"""
