"""Control: the 10 Hz loop, the rate keeper, real-time set-up, the uncertainty gate and the safety layer.

May import `edge.io` (protocol constants) and is handed its devices and pipeline; never imports
`edge.service`.
"""
