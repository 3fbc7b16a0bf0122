"""ROS 2 topics over DDS without rclpy: the camera, instruction, command, telemetry, e-stop and status roles.

A ROS 2 node is reachable on the wire without rclpy. ROS 2's DDS middlewares publish topic ``X`` as DDS topic
``rt/X`` with type ``<pkg>::msg::dds_::<Name>_``, encoded as XCDR1 (plain CDR) with final extensibility; the
types in :mod:`edge.io.ros2.msgs` follow that, field by field from ROS 2's own ``.msg`` files. The DDS
binding is the ``cyclonedds`` package (``pip install 'vla-edge[ros2]'``), imported lazily: importing this
package never needs it, creating a participant or a message type does.

Imports only the standard library, numpy, OpenCV, ``cyclonedds`` and ``edge``'s shared modules and
``edge.io``; never ``edge.inference``, ``edge.control`` or ``edge.service``.
"""
