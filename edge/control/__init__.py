"""Control: the 10 Hz loop, the chunk scheduler and inference worker of chunk policies, the cameras and
proprio the loop observes, the rate keeper, real-time set-up, the uncertainty gate and the safety layer.

May import `edge.io` (protocol constants) and `edge.inference` (the policy spec) and is handed its
devices and pipeline; never imports `edge.service`.
"""
