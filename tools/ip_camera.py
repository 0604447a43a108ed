"""An IP camera on 127.0.0.1 for tests and soaks: MJPEG over HTTP (multipart/x-mixed-replace), as many IP cameras
serve it, with the faults real ones have.

    python tools/ip_camera.py --mode stall|flap|steady [--frames 20] [--fps 15] [--port 0]

- ``steady``: frames for as long as the client reads.
- ``stall``: each connection gets ``frames`` frames, then nothing more, its socket held open: a reader ends up blocked
  inside FFmpeg's read, the state a stalled network camera leaves a capture thread in.
- ``flap``: each connection gets ``frames`` frames, then the camera drops the connection and answers 503 for
  ``down_s`` seconds (a camera rebooting, a flaky link), then comes back.
"""

from __future__ import annotations

import argparse
import http.server
import select
import threading
import time

import cv2
import numpy as np

BOUNDARY = b"frame"
MODES = ("steady", "stall", "flap")


class IpCamera:
    """Serves ``url`` (``http://127.0.0.1:PORT/cam.mjpg``) in a daemon thread; a context manager.

    Attributes:
        stalls: monotonic times at which connections stalled (``stall``) or dropped (``flap``).
        connections: connections served frames.
    """

    def __init__(self, mode: str = "steady", frames: int = 20, fps: float = 15.0, size: tuple[int, int] = (96, 72),
                 down_s: float = 2.0, port: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode, self.frames, self.fps, self.size, self.down_s = mode, frames, fps, size, down_s
        self.stalls: list[float] = []
        self.connections = 0
        self._down_until = 0.0
        self._closed = threading.Event()
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if time.monotonic() < camera._down_until:
                    self.send_error(503, "camera restarting")
                    return
                camera.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY.decode()}")
                self.end_headers()
                w, h = camera.size
                i = 0
                while not camera._closed.is_set() and (camera.mode == "steady" or i < camera.frames):
                    # A moving bar, so consecutive frames differ as a scene's do.
                    image = np.zeros((h, w, 3), np.uint8)
                    x = (i * 3) % w
                    image[:, x:x + max(1, w // 8)] = (40, 200, 255)
                    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
                    try:
                        self.wfile.write(b"--" + BOUNDARY + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                        self.wfile.flush()
                    except OSError:
                        return  # the reader went away
                    i += 1
                    time.sleep(1 / camera.fps)
                camera.stalls.append(time.monotonic())
                if camera.mode == "stall":
                    # The connection stays open and silent until the reader hangs up (or the camera closes): a
                    # handler that waited for ever would hold a thread and a socket per abandoned reader.
                    while not camera._closed.is_set():
                        readable, _, _ = select.select([self.connection], [], [], 0.5)
                        if readable and not self.connection.recv(1024):
                            return
                else:
                    camera._down_until = time.monotonic() + camera.down_s
                    self.close_connection = True

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/cam.mjpg"
        self._thread = threading.Thread(target=self._server.serve_forever, name="ip-camera", daemon=True)

    def __enter__(self) -> IpCamera:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()

    def wait_stalls(self, count: int, timeout: float) -> float:
        """Waits until ``count`` connections have stalled (or dropped); returns the time of the last one."""
        deadline = time.monotonic() + timeout
        while len(self.stalls) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.stalls)} of {count} stalls after {timeout} s")
            time.sleep(0.05)
        return self.stalls[count - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=MODES, default="steady")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--size", default="96x72", help="WxH")
    ap.add_argument("--down-s", type=float, default=2.0, help="flap: seconds the camera answers 503")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    with IpCamera(args.mode, args.frames, args.fps, size=(w, h), down_s=args.down_s, port=args.port) as camera:
        print(camera.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
