"""The ``--show`` window: each stream's frames with the overlay drawn on (:func:`streamtsm.overlay.annotate`), one
window per stream; q or Esc quits the run.

A window can block (a compositor that stalls, a window being dragged), so :func:`display_sink` runs it behind an
:class:`~streamtsm.sinks.annotated.AnnotatingSink`: OpenCV's window calls all happen on that sink's thread, and a
window that falls behind loses its oldest frames, never a model step.

Without a display, OpenCV's Qt backend aborts the whole process (exit 134) at the first window, and the headless
wheel (``opencv-python-headless``) has no window backend at all; :func:`check_display` finds both cases out
beforehand, so ``--show`` refuses to start with one line instead.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

import cv2

from streamtsm.errors import ConfigError
from streamtsm.overlay import StreamView, annotate
from streamtsm.sinks.annotated import AnnotatingSink, ViewedFrame

# Frames the window's queue holds per stream: the newest and the one being drawn.
FRAMES_PER_STREAM = 2


def gui_backend(build_information: str | None = None) -> str | None:
    """The window backend OpenCV was built with (``QT5``, ``GTK3``, ``WIN32UI``, ``COCOA``...), or None when it has
    none (the headless wheels).

    Args:
        build_information: the text of ``cv2.getBuildInformation()`` (read when None).
    """
    text = cv2.getBuildInformation() if build_information is None else build_information
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("GUI:"):
            value = line.split(":", 1)[1].strip()
            if value:
                return None if value.upper() == "NONE" else value
            # Older builds list the backends below the heading, one per line ("GTK+: YES (ver 3.24.20)").
            indent = len(line) - len(line.lstrip())
            for below in lines[i + 1:]:
                if not below.strip() or len(below) - len(below.lstrip()) <= indent:
                    break
                name, _, said = below.strip().partition(":")
                if said.strip().upper().startswith("YES") and "opengl" not in name.lower():
                    return name.strip()
            return None
    return None


def _x_server_reachable(display: str) -> bool:
    """Whether an X server answers at ``display`` (``:0``, ``:1.0``, ``host:0``, ``unix:0``)."""
    host, _, rest = display.rpartition(":")
    number = rest.split(".", 1)[0]
    if not number.isdigit():
        return False
    if host in ("", "unix") or host.startswith("/"):
        # A local server listens on a socket file, and on Linux also on the abstract name (containers often share
        # only that one).
        addresses = [f"/tmp/.X11-unix/X{number}", f"\0/tmp/.X11-unix/X{number}"]
        family = socket.AF_UNIX
    else:
        addresses, family = [(host, 6000 + int(number))], socket.AF_INET
    for address in addresses:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(2.0)
                s.connect(address)
                return True
        except OSError:
            continue
    return False


def check_display(environ: dict | None = None, platform: str | None = None,
                  build_information: str | None = None) -> None:
    """Makes sure ``--show`` can open windows, before any window is created or model loaded.

    On Linux a window needs ``DISPLAY`` (an X server that answers) or ``WAYLAND_DISPLAY`` (its socket), unless Qt is
    told to draw without one (``QT_QPA_PLATFORM=offscreen``); everywhere OpenCV needs a window backend.

    Raises:
        ConfigError: one line saying what is missing and what to do instead.
    """
    env = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    backend = gui_backend(build_information)
    if backend is None:
        raise ConfigError("--show needs an OpenCV with a window backend, and this one has none (the 'GUI:' section "
                          "of cv2.getBuildInformation() is empty; opencv-python-headless?): install opencv-python, "
                          "or keep the annotated video with --output FILE")
    if not platform.startswith("linux") or env.get("QT_QPA_PLATFORM", "") in ("offscreen", "minimal", "vnc"):
        return
    x_display, wayland = env.get("DISPLAY", ""), env.get("WAYLAND_DISPLAY", "")
    if x_display:
        if not _x_server_reachable(x_display):
            raise ConfigError(f"--show needs a display, and no X server answers at DISPLAY={x_display}; run it on "
                              "a desktop or keep the annotated video with --output FILE")
        return
    if wayland:
        runtime = env.get("XDG_RUNTIME_DIR", "")
        path = Path(wayland) if wayland.startswith("/") else Path(runtime) / wayland
        if not path.exists():
            raise ConfigError(f"--show needs a display, and there is no Wayland socket at {path}; run it on a "
                              "desktop or keep the annotated video with --output FILE")
        return
    raise ConfigError("--show needs a display, and neither DISPLAY nor WAYLAND_DISPLAY is set (no desktop session, "
                      "e.g. over ssh without -X); keep the annotated video with --output FILE instead")


class Display:
    """Draws each stream's newest frame with its overlay into a window of its own; q or Esc sets ``stop``.

    Its ``on_step`` takes a :class:`~streamtsm.sinks.annotated.ViewedFrame` (see :func:`display_sink`).

    Args:
        stop: the run's stop event.
    """

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def on_message(self, topic: str, payload: dict) -> None:
        pass

    def on_step(self, item: ViewedFrame) -> None:
        self.show(item.result.stream_id, item.result.frame.image, item.view)

    def show(self, stream_id: str, image, view: StreamView) -> None:
        """Draws ``view`` on a copy of ``image`` (BGR) and shows it in the stream's window.

        Raises:
            ConfigError: If OpenCV cannot open a window (no display).
        """
        annotated = annotate(image, view)
        try:
            cv2.imshow(f"streamtsm {stream_id}", annotated)
            key = cv2.waitKey(1) & 0xFF
        except cv2.error as e:
            raise ConfigError(f"--show needs a display OpenCV can open windows on ({str(e).strip()[:80]})") from None
        if key in (ord("q"), 27):
            self.stop.set()

    def close(self) -> None:
        try:
            cv2.destroyAllWindows()
        except cv2.error:
            pass


def display_sink(stop: threading.Event, streams: int = 1) -> AnnotatingSink:
    """The ``--show`` window as a sink: the overlay kept from every message, and a :class:`Display` on its own
    thread behind a queue of the newest ``FRAMES_PER_STREAM`` frames per stream (``drop_oldest``)."""
    return AnnotatingSink(Display(stop), maxsize=FRAMES_PER_STREAM * max(1, streams), policy="drop_oldest",
                          name="display")
