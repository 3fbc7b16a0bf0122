"""`vla-edge doctor`: each check's OK and FAIL paths against real files, devices and sockets.

Serial ports are real ptys, the camera a real video file opened by OpenCV, the bundle the session's
reference bundle (and hard-linked copies of it with one file changed), the metrics port a real listening
socket. TensorRT and CUDA are the faithful fakes from tests/fakes, injected for the engine-key checks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from edge.inference.bundle import file_sha256
from edge.inference.engine_key import EngineKey, key_path
from edge.service import doctor
from edge.service.config import config_from_dict
from edge.service.doctor import Status
from tests.fakes.conftest_fakes import fake_gpu
from tests.fakes.fake_cuda import FakeCudaRuntime


def make_config(**sections):
    raw = {"bundle": "/nonexistent/bundle", "camera": {"source": "http://127.0.0.1:8080/video"},
           "motor": {"port": "socket://127.0.0.1:5000"}}
    raw.update(sections)
    return config_from_dict(raw)


def write_config(path: Path, bundle, **sections) -> Path:
    raw = {"bundle": str(bundle), "camera": {"source": "http://127.0.0.1:8080/video"},
           "motor": {"port": "socket://127.0.0.1:5000"}}
    raw.update(sections)
    path.write_text(yaml.safe_dump(raw))
    return path


def by_name(results, name):
    found = [r for r in results if r.name == name]
    assert found, f"no {name!r} check in {[r.name for r in results]}"
    return found


@pytest.fixture()
def pty_path():
    leader, follower = os.openpty()
    try:
        yield os.ttyname(follower)
    finally:
        os.close(follower)
        os.close(leader)


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of the bundle whose files are hard links (cheap); replace a file with `rewrite`, never edit it
    in place, or the original changes too."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def rewrite(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def save_manifest(root: Path, manifest: dict) -> None:
    from edge.inference.bundle import write_manifest_digest

    rewrite(root / "manifest.json", json.dumps(manifest, indent=2).encode())
    write_manifest_digest(root)  # schema v2 covers the manifest by its digest


# --- config -------------------------------------------------------------------------------------------


def test_config_that_loads_is_ok_and_names_target_and_bundle(tmp_path):
    result, config = doctor.check_config(write_config(tmp_path / "robot.yaml", tmp_path / "b"))
    assert result.status is Status.OK and config is not None
    # target and threads default to auto: measured on this machine (or taken from `vla-edge tune`'s cache)
    assert "target auto on onnxruntime" in result.message and str(tmp_path / "b") in result.message


def test_config_error_fails_naming_the_key_and_stops_the_other_checks(tmp_path):
    path = write_config(tmp_path / "robot.yaml", tmp_path / "b", loop={"rate_hz": 500})
    results = doctor.run_checks(path)
    assert [r.status for r in results] == [Status.FAIL]
    assert "loop.rate_hz" in results[0].message and "[1.0, 200.0]" in results[0].message
    missing = doctor.run_checks(tmp_path / "absent.yaml")
    assert missing[0].status is Status.FAIL and "absent.yaml" in missing[0].message
    assert doctor.exit_status(missing) == 1


# --- bundle -------------------------------------------------------------------------------------------


def test_reference_bundle_is_ok(reference_bundle):
    results, bundle = doctor.check_bundle(make_config(bundle=str(reference_bundle[0])))
    assert bundle is not None
    assert [r.status for r in results] == [Status.OK]
    assert f"{len(bundle.manifest['files'])} files match their sha256" in results[0].message


def test_modified_graph_fails_naming_the_file_and_the_rebuild_command(reference_bundle, tmp_path):
    copy = linked_copy(reference_bundle[0], tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    graph = manifest["graphs"]["head"]["files"]["fp32"]
    data = bytearray((copy / graph).read_bytes())
    data[len(data) // 2] ^= 0xFF
    rewrite(copy / graph, bytes(data))
    results, bundle = doctor.check_bundle(make_config(bundle=str(copy)))
    assert bundle is None and len(results) == 1 and results[0].status is Status.FAIL
    assert graph in results[0].message and "does not match its sha256" in results[0].message
    assert f"build-engines --int8 --out {copy} --force" in results[0].message
    assert file_sha256(reference_bundle[0] / graph) == manifest["files"][graph], "the original must be intact"


def test_bundle_without_the_target_or_enough_samples_fails(reference_bundle, tmp_path):
    copy = linked_copy(reference_bundle[0], tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["targets"]["fp16"]  # as a build without --fp16 writes it
    save_manifest(copy, manifest)
    results, _ = doctor.check_bundle(make_config(bundle=str(copy), policy={"target": "fp16"}))
    assert results[-1].status is Status.FAIL and "no target 'fp16'" in results[-1].message
    results, bundle = doctor.check_bundle(make_config(bundle=str(copy), policy={"mc_samples": 256}))
    assert results[-1].status is Status.FAIL
    assert f"max_samples {bundle.dropout['max_samples']}" in results[-1].message


# --- TensorRT engines (fake TensorRT 10 + fake CUDA GPU) -----------------------------------------------


@pytest.fixture()
def bundle_with_engines(reference_bundle, tmp_path):
    """A copy of the reference bundle with engines for the tensorrt target, keyed TensorRT 10.3.0 / sm 8.7,
    laid out as build-engines writes them (engines/<graph>_<variant>.engine + .key.json, in the manifest)."""
    copy = linked_copy(reference_bundle[0], tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    if "tensorrt" not in manifest["targets"]:
        pytest.skip("the reference bundle has no tensorrt target")
    (copy / "engines").mkdir(exist_ok=True)
    engines = []
    for graph, variant in sorted(manifest["targets"]["tensorrt"].items()):
        source = manifest["graphs"][graph]["files"][variant]
        precision = {"int8-tensorrt": "int8", "fp16": "fp16"}.get(variant, "fp32")
        key = EngineKey(manifest["files"][source], "10.3.0", "8.7", precision, "Orin (fake)", "16")
        engine = copy / "engines" / f"{graph}_{variant}.engine"
        engine.write_bytes(b"serialized engine " + graph.encode())
        key.save(key_path(engine))
        for path in (engine, key_path(engine)):
            manifest["files"][str(path.relative_to(copy))] = file_sha256(path)
        engines.append({"graph": graph, "variant": variant, "path": str(engine.relative_to(copy)),
                        **key.to_dict()})
    manifest["engines"] = engines
    save_manifest(copy, manifest)
    return copy, manifest


def tensorrt_checks(root: Path, version="10.3.0", capability=(8, 7)):
    config = make_config(bundle=str(root), policy={"target": "tensorrt", "backend": "tensorrt"})
    results, bundle = doctor.check_bundle(config)
    assert all(r.status is Status.OK for r in results), results
    trt, cudart = fake_gpu(version, compute_capability=capability)
    return doctor.check_tensorrt(config, bundle, trt=trt, cudart=cudart)


def test_engines_built_for_this_tensorrt_and_gpu_are_ok(bundle_with_engines):
    root, manifest = bundle_with_engines
    results = tensorrt_checks(root)
    assert all(r.status is Status.OK for r in results), [r.line() for r in results]
    assert "TensorRT 10.3.0" in by_name(results, "tensorrt")[0].message
    engine_lines = [r for r in results if r.name.startswith("engine ")]
    assert len(engine_lines) == len(manifest["targets"]["tensorrt"])


@pytest.mark.parametrize(("version", "capability", "expected"), [
    ("10.4.0", (8, 7), "TensorRT version: engine 10.3.0, required 10.4.0"),
    ("10.3.0", (7, 2), "GPU compute capability: engine 8.7, required 7.2"),
])
def test_engines_from_another_tensorrt_or_gpu_fail_naming_the_rebuild(bundle_with_engines, version, capability,
                                                                       expected):
    root, manifest = bundle_with_engines
    results = tensorrt_checks(root, version, capability)
    failed = [r for r in results if r.status is Status.FAIL]
    assert len(failed) == len(manifest["targets"]["tensorrt"])
    for result in failed:
        assert expected in result.message
        assert f"build-engines --engines-only {root}" in result.fix  # engines only, on the robot
    assert doctor.exit_status(results) == 1


def test_engines_keyed_before_the_gpu_was_recorded_fail_naming_the_engines_command(bundle_with_engines):
    root, manifest = bundle_with_engines
    for entry in manifest["engines"]:  # a manifest and key files as builds before the GPU fields wrote them
        del entry["gpu_name"], entry["multiprocessors"]
        key_file = key_path(root / entry["path"])
        EngineKey.from_dict(entry).save(key_file)
        manifest["files"][str(key_file.relative_to(root))] = file_sha256(key_file)
    save_manifest(root, manifest)
    failed = [r for r in tensorrt_checks(root) if r.status is Status.FAIL]
    assert len(failed) == len(manifest["targets"]["tensorrt"])
    for result in failed:
        assert "GPU: engine unknown (a key written before the GPU was recorded: rebuild the engines), required " \
               "Orin (fake)" in result.message
        assert f"build-engines --engines-only {root}" in result.fix


def test_an_orin_nano_engine_does_not_pass_on_an_agx_orin(bundle_with_engines):
    root, manifest = bundle_with_engines
    config = make_config(bundle=str(root), policy={"target": "tensorrt", "backend": "tensorrt"})
    _, bundle = doctor.check_bundle(config)
    trt, _ = fake_gpu("10.3.0")
    agx = FakeCudaRuntime(compute_capability=(8, 7), name="Orin (fake)", multiprocessors=8)  # same sm 8.7
    failed = [r for r in doctor.check_tensorrt(config, bundle, trt=trt, cudart=agx) if r.status is Status.FAIL]
    assert failed and all("GPU multiprocessors: engine 16, required 8" in r.message for r in failed)


def test_tensorrt_8_is_refused_naming_jetpack_6_1(bundle_with_engines):
    root, _ = bundle_with_engines
    config = make_config(bundle=str(root), policy={"target": "tensorrt", "backend": "tensorrt"})
    _, bundle = doctor.check_bundle(config)
    trt8, cudart = fake_gpu("8.6.2")
    results = doctor.check_tensorrt(config, bundle, trt=trt8, cudart=cudart)
    assert [r.status for r in results] == [Status.FAIL]
    assert "JetPack 6.1+" in results[0].message and "--engines-only" in results[0].fix


def test_engine_from_another_graph_or_missing_fails(bundle_with_engines):
    root, manifest = bundle_with_engines
    entries = manifest["engines"]
    stale = dict(entries[0], source_sha256="0" * 64)  # built from a graph the bundle no longer ships
    key_file = key_path(root / stale["path"])
    EngineKey.from_dict(stale).save(key_file)  # os.replace: the hard link to the original is not touched
    manifest["files"][str(key_file.relative_to(root))] = file_sha256(key_file)
    manifest["engines"] = [stale, *entries[2:]]  # ...and the second engine is gone
    save_manifest(root, manifest)
    results = tensorrt_checks(root)
    lines = {r.name: r for r in results}
    first = lines[f"engine {entries[0]['graph']}/{entries[0]['variant']}"]
    assert first.status is Status.FAIL and "source graph sha256: engine 000000000000" in first.message
    second = lines[f"engine {entries[1]['graph']}/{entries[1]['variant']}"]
    assert second.status is Status.FAIL and "has no TensorRT engine" in second.message


def test_edited_engine_key_file_fails(bundle_with_engines):
    root, manifest = bundle_with_engines
    key_file = key_path(root / manifest["engines"][0]["path"])
    edited = json.loads(key_file.read_text())
    edited["compute_capability"] = "7.2"  # digest no longer matches
    rewrite(key_file, json.dumps(edited).encode())
    manifest["files"][str(key_file.relative_to(root))] = file_sha256(key_file)
    save_manifest(root, manifest)
    results = tensorrt_checks(root)
    assert "was edited" in results[1].message and results[1].status is Status.FAIL


def test_missing_tensorrt_fails_with_the_jetpack_hint(bundle_with_engines):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    root, _ = bundle_with_engines
    config = make_config(bundle=str(root), policy={"target": "tensorrt", "backend": "tensorrt"})
    _, bundle = doctor.check_bundle(config)
    results = doctor.check_tensorrt(config, bundle)
    assert [r.status for r in results] == [Status.FAIL]
    assert "--system-site-packages" in results[0].fix


# --- onnxruntime --------------------------------------------------------------------------------------


def test_onnxruntime_cpu_is_ok_and_missing_cuda_provider_fails():
    import onnxruntime

    results = doctor.check_onnxruntime(make_config())
    assert results[0].status is Status.OK and "CPUExecutionProvider" in results[0].message
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    cuda = doctor.check_onnxruntime(make_config(policy={"device": "cuda"}))
    assert cuda[0].status is Status.FAIL and "onnxruntime-gpu" in cuda[0].fix


# --- serial -------------------------------------------------------------------------------------------


def test_pty_serial_device_is_ok(pty_path):
    result = doctor.check_serial(make_config(motor={"port": pty_path}).motor)
    assert result.status is Status.OK and "character device" in result.message


def test_symlinked_pty_is_ok_and_dangling_link_fails(pty_path, tmp_path):
    link = tmp_path / "vla-motor"
    link.symlink_to(pty_path)
    result = doctor.check_serial(make_config(motor={"port": str(link)}).motor)
    assert result.status is Status.OK and pty_path in result.message
    dangling = tmp_path / "gone"
    dangling.symlink_to(tmp_path / "unplugged")
    result = doctor.check_serial(make_config(motor={"port": str(dangling)}).motor)
    assert result.status is Status.FAIL and "dangling" in result.message


def test_missing_or_non_device_serial_path_fails(tmp_path):
    missing = doctor.check_serial(make_config(motor={"port": str(tmp_path / "ttyUSB7")}).motor)
    assert missing.status is Status.FAIL and "does not exist" in missing.message and "by-id" in missing.fix
    regular = tmp_path / "not-a-port"
    regular.write_text("")
    result = doctor.check_serial(make_config(motor={"port": str(regular)}).motor)
    assert result.status is Status.FAIL and "not a character device" in result.message


def _check_serial_as_nobody(port: str) -> dict:
    """check_serial run by an unprivileged user: root may open anything, so a forked child drops to
    nobody (uid/gid 65534, no supplementary groups) and sends its result back through a pipe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = doctor.check_serial(make_config(motor={"port": port}).motor)
            os.write(write_fd, json.dumps(result.to_dict()).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed"
    return json.loads(payload)


def test_serial_device_without_permission_fails_with_the_group_hint(pty_path):
    if os.geteuid() == 0:
        result = _check_serial_as_nobody(pty_path)
    else:
        os.chmod(pty_path, 0o000)  # a pty belongs to its opener: take our own access away
        result = doctor.check_serial(make_config(motor={"port": pty_path}).motor).to_dict()
    assert result["status"] == "FAIL"
    assert "no read/write access" in result["message"] and "usermod -aG" in result["message"]
    assert "dialout" in result["message"]


def test_serial_urls(tmp_path):
    assert doctor.check_serial(make_config(motor={"port": "socket://127.0.0.1:5000"}).motor).status is Status.OK
    assert doctor.check_serial(make_config(motor={"port": "loop://"}).motor).status is Status.OK
    unknown = doctor.check_serial(make_config(motor={"port": "carrier-pigeon://coop"}).motor)
    assert unknown.status is Status.FAIL and "no handler" in unknown.message
    no_port = doctor.check_serial(make_config(motor={"port": "socket://127.0.0.1"}).motor)
    assert no_port.status is Status.FAIL


# --- camera -------------------------------------------------------------------------------------------


@pytest.fixture()
def video_file(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for i in range(10):
        writer.write(np.full((48, 64, 3), i * 20, np.uint8))
    writer.release()
    return path


def test_video_file_is_ok_and_opens_for_real(video_file):
    camera = make_config(camera={"source": str(video_file)}).camera
    results = doctor.check_camera(camera, open_camera=True, timeout_s=10.0)
    assert [r.status for r in results] == [Status.OK, Status.OK], [r.line() for r in results]
    assert "48x64x3" in results[1].message


def test_missing_camera_sources_fail(tmp_path):
    missing = doctor.check_camera(make_config(camera={"source": str(tmp_path / "none.mp4")}).camera)
    assert missing[0].status is Status.FAIL and "does not exist" in missing[0].message
    device = doctor.check_camera(make_config(camera={"source": 97}).camera, open_camera=True)
    assert len(device) == 1, "a failed source check must not be followed by an open"
    assert device[0].status is Status.FAIL and "/dev/video97" in device[0].message
    path = doctor.check_camera(make_config(camera={"source": "/dev/v4l/by-id/usb-none-video-index0"}).camera)
    assert path[0].status is Status.FAIL


def test_camera_urls_parse_without_opening_unless_asked():
    good = doctor.check_camera(make_config(camera={"source": "rtsp://cam.local:8554/live"}).camera)
    assert good[0].status is Status.OK and "not opened" in good[0].message
    bad_port = doctor.check_camera(make_config(camera={"source": "http://127.0.0.1:99999/video"}).camera)
    assert bad_port[0].status is Status.FAIL and "port" in bad_port[0].message
    no_host = doctor.check_camera(make_config(camera={"source": "http:///video"}).camera)
    assert no_host[0].status is Status.FAIL


def test_opening_a_dead_stream_fails_within_the_timeout():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    camera = make_config(camera={"source": f"http://127.0.0.1:{port}/video"}).camera
    results = doctor.check_camera(camera, open_camera=True, timeout_s=1.0)
    assert results[0].status is Status.OK
    assert results[1].status is Status.FAIL and "delivered no frame within 1 s" in results[1].message


def test_gstreamer_pipeline_needs_an_opencv_with_gstreamer():
    pipeline = "videotestsrc ! videoconvert ! appsink drop=true max-buffers=1"
    result = doctor.check_camera(make_config(camera={"source": pipeline}).camera)[0]
    if doctor._opencv_has("GStreamer"):
        assert result.status is Status.OK
    else:
        assert result.status is Status.FAIL and "without GStreamer" in result.message
        assert "python3-opencv" in result.fix


# --- real time ----------------------------------------------------------------------------------------


def test_realtime_limits_warn_when_missing_and_pass_when_granted():
    import resource

    config = make_config(realtime={"sched_fifo_priority": 50, "lock_memory": True})
    denied = doctor.check_realtime(config, capabilities=0, getrlimit=lambda which: (0, 0))
    assert [r.status for r in denied] == [Status.WARN, Status.WARN]
    assert "LimitRTPRIO=50" in denied[0].fix and "LimitMEMLOCK=infinity" in denied[1].fix
    assert doctor.exit_status(denied) == 0, "a WARN does not stop the service"

    def granted(which):
        return (50, 50) if which == resource.RLIMIT_RTPRIO else (resource.RLIM_INFINITY, resource.RLIM_INFINITY)

    assert [r.status for r in doctor.check_realtime(config, capabilities=0, getrlimit=granted)] == [Status.OK] * 2
    low = doctor.check_realtime(config, capabilities=0, getrlimit=lambda which: (10, 10))
    assert low[0].status is Status.WARN and "RLIMIT_RTPRIO is 10" in low[0].message
    sys_nice = doctor.check_realtime(config, capabilities=1 << 23 | 1 << 14, getrlimit=lambda which: (0, 0))
    assert [r.status for r in sys_nice] == [Status.OK] * 2


def test_realtime_cpu_affinity_outside_this_process_fails():
    available = sorted(os.sched_getaffinity(0))
    ok = doctor.check_realtime(make_config(realtime={"cpu_affinity": available[:1]}))
    assert ok[0].status is Status.OK
    bad = doctor.check_realtime(make_config(realtime={"cpu_affinity": [4095]}))
    assert bad[0].status is Status.FAIL and "[4095]" in bad[0].message


# --- metrics and control socket -----------------------------------------------------------------------


def test_metrics_port_in_use_fails():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = doctor.check_metrics(make_config(metrics={"enabled": True, "port": port}))
        assert busy[0].status is Status.FAIL and str(port) in busy[0].message
    free = doctor.check_metrics(make_config(metrics={"enabled": True, "port": port}))
    assert free[0].status is Status.OK
    assert doctor.check_metrics(make_config()) == [], "disabled metrics are not checked"


def test_control_socket_directory(tmp_path):
    ok = doctor.check_control_socket(make_config(instruction={"socket": str(tmp_path / "c.sock")}), {})
    assert ok[0].status is Status.OK
    missing = doctor.check_control_socket(make_config(instruction={"socket": str(tmp_path / "no/c.sock")}), {})
    assert missing[0].status is Status.FAIL and "does not exist" in missing[0].message
    (tmp_path / "taken").write_text("")
    taken = doctor.check_control_socket(make_config(instruction={"socket": str(tmp_path / "taken")}), {})
    assert taken[0].status is Status.FAIL and "not a socket" in taken[0].message
    # By hand, with the service stopped, systemd's RuntimeDirectory does not exist yet: a warning only.
    by_hand = doctor.check_control_socket(make_config(instruction={"socket": "/run/vla-edge/control.sock"}), {})
    if not Path("/run/vla-edge").is_dir():
        assert by_hand[0].status is Status.WARN


def test_running_mode_fails_when_the_service_does_not_answer(tmp_path, pty_path):
    path = write_config(tmp_path / "robot.yaml", tmp_path / "no-bundle", motor={"port": pty_path},
                        instruction={"socket": str(tmp_path / "control.sock")})
    results = doctor.run_checks(path, running=True)
    assert [r.name for r in results] == ["config", "serial", "camera", "service"], "no bundle or backend checks"
    assert results[-1].status is Status.FAIL and "control.sock" in results[-1].message
    without_socket = doctor.run_checks(write_config(tmp_path / "r2.yaml", tmp_path / "b", motor={"port": pty_path}),
                                       running=True)
    assert without_socket[-1].status is Status.WARN and "instruction.socket" in without_socket[-1].message


# --- the command --------------------------------------------------------------------------------------


def doctor_cli(argv):
    parser = argparse.ArgumentParser(prog="vla-edge")
    doctor.add_doctor_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_command_prints_one_line_per_check_and_exits_1_on_fail(reference_bundle, tmp_path, pty_path, capsys):
    path = write_config(tmp_path / "robot.yaml", reference_bundle[0], motor={"port": pty_path},
                        camera={"source": str(tmp_path / "missing.avi")})
    assert doctor_cli(["doctor", "--config", str(path)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("OK    config:")
    assert any(line.startswith("OK    bundle:") for line in lines)
    assert any(line.startswith("OK    serial:") for line in lines)
    assert any(line.startswith("FAIL  camera:") and "missing.avi" in line for line in lines)
    assert lines[-1].startswith("1 FAIL")


def test_command_json_and_exit_0_when_all_pass(reference_bundle, tmp_path, pty_path, video_file, capsys):
    path = write_config(tmp_path / "robot.yaml", reference_bundle[0], motor={"port": pty_path},
                        camera={"source": str(video_file)})
    assert doctor_cli(["doctor", "--config", str(path), "--json", "--open-camera"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    names = [c["name"] for c in report["checks"]]
    assert names[:3] == ["config", "bundle", "onnxruntime"] and "camera open" in names
    assert all(c["status"] in ("OK", "WARN") for c in report["checks"])
