"""The web viewer of `mgs view RUN`: a viser server showing a run's merged model.

The page shows the block cells as boxes and the train/test cameras as frustums, coloured by
block; a side panel holds one checkbox per block, the run's metrics and the image of the last
clicked camera (clicking a frustum also moves the view there). The model itself is rendered
here, on this process's device (our rasterizer on the CPU, gsplat on CUDA), from each browser's
camera, and sent as the page's background image: while the camera moves, at `--render-size`
pixels (quick, stretched to the window); once it has rested for `REST_SECONDS`, once more at the
browser canvas's own size (sharp). No GPU is needed in the browser beyond drawing one textured
quad.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mgs.errors import MgsError
from mgs.view.scene import RunView, block_colour, intrinsics, vertical_fov

log = logging.getLogger("mgs.view")

# longer side of the render while the camera moves: interactive on 2 CPU cores, sharp on a GPU
DEFAULT_RENDER_SIZE = {"cpu": 320, "cuda": 960}
REST_SECONDS = 0.3  # no camera move for this long: render at the canvas size
MAX_CANVAS_SIDE = 4096  # cap of the at-rest render (a 4K window on a HiDPI screen is 2× that)
SCREENSHOT_SIZE = (1280, 800)
METRIC_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips_vgg": "LPIPS VGG",
                 "lpips_alex": "LPIPS Alex", "psnr_cc": "PSNR, colour-corrected (dB)"}


class Viewer:
    """A viser server showing one run; `serve()` until Ctrl-C, or `screenshot()` once."""

    def __init__(self, view: RunView, host: str = "127.0.0.1", port: int = 8080,
                 render_size: int | None = None, rest_seconds: float | None = REST_SECONDS):
        """`rest_seconds`: quiet time before the canvas-sized render (None: never, every frame
        stays at `render_size`)."""
        import viser

        self.view = view
        self.render_size = render_size or DEFAULT_RENDER_SIZE.get(view.device.type, 320)
        self.rest_seconds = rest_seconds
        self.sent_sizes: list[tuple[int, int]] = []  # (width, height) of each frame sent
        self.enabled = set(range(view.num_blocks))
        self._closing = threading.Event()
        self._workers: dict[int, threading.Event] = {}
        self._last_sent = 0.0
        self._pending = 0
        self._settling: dict[int, bool] = {}  # client id → a canvas-sized frame is still due
        self._state_lock = threading.Lock()
        self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.url = f"http://{host}:{self.server.get_port()}/"
        self.server.scene.set_up_direction(tuple(float(v) for v in view.up))
        self._extent = float(np.linalg.norm(view.partition.aabb[1] - view.partition.aabb[0]))
        self._start_camera()
        self._add_cells()
        self._add_panel()
        self._add_cameras()
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)

    # ------------------------------------------------------------------ scene

    def _pose(self, camera) -> tuple[np.ndarray, np.ndarray]:
        """(position, look-at point) of a scene camera, the look-at point at the scene centre's
        depth so that orbiting turns around what the camera sees."""
        forward = camera.world_to_camera[2, :3]
        depth = max(float((self.view.centre - camera.center) @ forward), 0.05 * self._extent)
        return camera.center, camera.center + depth * forward

    def _start_camera(self) -> None:
        cameras = self.view.scene.test_cameras() or self.view.scene.train_cameras()
        position, target = self._pose(cameras[0])
        initial = self.server.initial_camera
        initial.position, initial.look_at = position, target
        initial.up = self.view.up
        initial.fov = vertical_fov(cameras[0])

    def _add_cells(self) -> None:
        edges: dict[int, list] = {}
        for box in self.view.cell_boxes():
            edges.setdefault(box.block, []).append(box.edges())
        self._cell_nodes = [self.server.scene.add_line_segments(
            f"/cells/block_{block}", np.concatenate(parts), block_colour(block), thickness=2.0,
            thickness_units="screen") for block, parts in sorted(edges.items())]

    def _add_cameras(self) -> None:
        import viser.transforms as tf

        scene, self._camera_nodes = self.view.scene, []
        test = set(scene.test_names)
        for camera in scene.cameras:
            split = "test" if camera.name in test else "train"
            block = self.view.camera_block(camera)
            node = self.server.scene.add_camera_frustum(
                f"/cameras/{split}/{len(self._camera_nodes)}", fov=vertical_fov(camera),
                aspect=camera.width / camera.height,
                scale=(0.03 if split == "test" else 0.02) * self._extent,
                color=block_colour(block), thickness=1.5, thickness_units="screen",
                wxyz=tf.SO3.from_matrix(camera.world_to_camera[:3, :3].T).wxyz,
                position=tuple(camera.center))
            node.on_click(lambda event, c=camera, s=split, b=block: self._fly_to(event.client,
                                                                                  c, s, b))
            self._camera_nodes.append(node)

    def _fly_to(self, client, camera, split: str, block: int) -> None:
        position, target = self._pose(camera)
        with client.atomic():
            client.camera.fov = vertical_fov(camera)
            client.camera.up_direction = self.view.up
            client.camera.position = position
            client.camera.look_at = target
        image = Image.open(camera.image_path).convert("RGB")
        image.thumbnail((320, 320))
        self._photo.image = np.asarray(image)
        self._photo.visible = True
        self._photo_caption.content = f"**{camera.name}**: {split} view, block {block}"

    # ------------------------------------------------------------------ panel

    def _add_panel(self) -> None:
        gui, view = self.server.gui, self.view
        gui.add_markdown(f"**{view.root.resolve().name}**: {view.backend} renderer on "
                         f"{view.device}, {self.render_size} px while moving, the window's "
                         "size at rest")
        with gui.add_folder("Blocks"):
            for block, count in enumerate(view.anchors_per_block()):
                box = gui.add_checkbox(f"block {block}", True, hint=f"{count} anchors")
                box.on_update(lambda event, b=block: self._toggle(b, event.target.value))
            cells = gui.add_checkbox("cell boxes", True)
            cells.on_update(lambda event: self._show(self._cell_nodes, event.target.value))
            cameras = gui.add_checkbox("cameras", True)
            cameras.on_update(lambda event: self._show(self._camera_nodes, event.target.value))
        with gui.add_folder("Metrics"):
            gui.add_markdown(metrics_markdown(view.metrics))
        with gui.add_folder("Camera"):
            self._photo_caption = gui.add_markdown("Click a camera frustum to fly there.")
            self._photo = gui.add_image(np.zeros((8, 8, 3), np.uint8), visible=False)

    @staticmethod
    def _show(nodes, visible: bool) -> None:
        for node in nodes:
            node.visible = visible

    def _toggle(self, block: int, on: bool) -> None:
        with self._state_lock:
            (self.enabled.add if on else self.enabled.discard)(block)
        self.redraw()

    def redraw(self) -> None:
        """Render every client's view again (small, then at the canvas size once at rest)."""
        with self._state_lock:
            wakes = list(self._workers.values())
        for wake in wakes:
            wake.set()

    # ------------------------------------------------------------------ rendering

    def _connect(self, client) -> None:
        wake = threading.Event()
        with self._state_lock:
            self._workers[client.client_id] = wake
        client.camera.on_update(lambda _camera: wake.set())
        threading.Thread(target=self._render_loop, args=(client, wake), daemon=True,
                         name=f"mgs-view-render-{client.client_id}").start()
        wake.set()

    def _disconnect(self, client) -> None:
        with self._state_lock:
            wake = self._workers.pop(client.client_id, None)
            self._settling.pop(client.client_id, None)
        if wake is not None:
            wake.set()  # the loop sees it is no longer registered and ends

    def _render_loop(self, client, wake: threading.Event) -> None:
        """Render the client's latest camera whenever it moved, small; once it rests, at the
        canvas size. Moves made during a render are folded into the next one, so a slow render
        never queues up stale frames; a sharp frame the camera left while it was drawn is
        dropped."""
        sharp_due = False
        while not self._closing.is_set():
            woke = wake.wait(timeout=self.rest_seconds if sharp_due else 0.5)
            if woke:
                wake.clear()
                sharp_due = self.rest_seconds is not None
            elif sharp_due:
                sharp_due = False
            else:
                continue
            with self._state_lock:
                if client.client_id not in self._workers:
                    return
                blocks = frozenset(self.enabled)
                self._pending += 1
            try:
                moved = camera_stamp(client.camera)
                image = self._render_client(client, blocks, sharp=not woke)
                stale = not woke and camera_stamp(client.camera) != moved
                if image is not None and not stale and not self._closing.is_set():
                    client.scene.set_background_image(image, format="jpeg", jpeg_quality=90)
                    self.sent_sizes.append((image.shape[1], image.shape[0]))
                    self._last_sent = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - one bad frame must not stop the viewer
                log.warning("render for client %d failed: %s: %s", client.client_id,
                            exc.__class__.__name__, exc)
            finally:
                with self._state_lock:
                    self._pending -= 1
                    self._settling[client.client_id] = sharp_due

    def _render_client(self, client, blocks: frozenset, sharp: bool = False) -> np.ndarray | None:
        import viser.transforms as tf

        camera = client.camera
        if camera_stamp(camera) == 0.0 or camera.fov <= 0 or camera.aspect <= 0:
            return None  # the browser has not reported its camera yet
        width, height = render_shape(self.render_size, camera.aspect)
        if sharp:
            width, height = canvas_shape(camera.image_width, camera.image_height, (width, height))
        rotation = tf.SO3(np.asarray(camera.wxyz)).as_matrix()  # camera to world, OpenCV axes
        viewmat = np.eye(4)
        viewmat[:3, :3] = rotation.T
        viewmat[:3, 3] = -rotation.T @ np.asarray(camera.position)
        return self.view.render(viewmat, intrinsics(camera.fov, width, height), width, height,
                                blocks)

    def wait_until_drawn(self, quiet: float = 1.5, timeout: float = 120.0) -> None:
        """Block until a render was sent and nothing was rendered for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._state_lock:
                busy = (self._pending > 0 or any(w.is_set() for w in self._workers.values())
                        or any(self._settling.values()))
            if self._last_sent and not busy and time.monotonic() - self._last_sent > quiet:
                return
            if time.monotonic() > deadline:
                raise MgsError(f"the viewer sent no render to the browser within {timeout} s")
            time.sleep(0.1)

    # ------------------------------------------------------------------ running

    def serve(self) -> None:
        log.info("viewer of %s at %s (Ctrl-C stops it)", self.view.root, self.url)
        if threading.current_thread() is threading.main_thread():
            # started in the background by a shell (`&`, nohup), a process inherits SIGINT
            # ignored and Python leaves it so: Ctrl-C / kill -INT must still stop the viewer
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            log.info("stopping the viewer")
        finally:
            self.close()

    def screenshot(self, path: str | Path, timeout: float = 120.0) -> Path:
        """Open the page in headless Chromium, wait for the panel and the render, save a PNG."""
        from mgs.view.browser import HeadlessPage, save_png

        try:
            with HeadlessPage(*SCREENSHOT_SIZE, timeout=timeout) as page:
                page.goto(self.url)
                page.wait_for("document.body && document.body.innerText.includes('block 0')",
                              "the block checkboxes")
                self.wait_until_drawn(timeout=timeout)
                time.sleep(0.5)  # the browser draws the image on its next frame
                data = page.screenshot()
        finally:
            self.close()
        path = save_png(data, path)
        log.info("wrote %s", path)
        return path

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        deadline = time.monotonic() + 10
        while self._pending and time.monotonic() < deadline:  # a frame in flight is dropped
            time.sleep(0.05)
        # viser's stop joins its event loop; on a busy machine that can stall, and Ctrl-C must
        # still end the command: stop in a daemon thread and give up waiting after 10 s
        stopper = threading.Thread(target=self.server.stop, daemon=True, name="mgs-view-stop")
        stopper.start()
        stopper.join(timeout=10)
        if stopper.is_alive():
            log.warning("the web server did not stop within 10 s; exiting without it")


def render_shape(longer_side: int, aspect: float) -> tuple[int, int]:
    """(width, height) with the given longer side and width / height = aspect."""
    if aspect >= 1:
        return longer_side, max(1, round(longer_side / aspect))
    return max(1, round(longer_side * aspect)), longer_side


def camera_stamp(camera) -> float:
    """When the browser last reported this camera; 0 before its first report (viser's
    public `update_timestamp` asserts instead)."""
    return camera._state.update_timestamp


def canvas_shape(width: int, height: int, fallback: tuple[int, int]) -> tuple[int, int]:
    """The browser canvas's (width, height), its longer side capped at MAX_CANVAS_SIDE;
    `fallback` when the browser has not reported a size."""
    if width <= 0 or height <= 0:
        return fallback
    scale = min(1.0, MAX_CANVAS_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def metrics_markdown(metrics: dict | None) -> str:
    if not metrics:
        return "No `eval/metrics.json` yet: run `mgs evaluate`."
    values = metrics.get("metrics", {})
    rows = [f"| {label} | {values[key]:.4g} |" for key, label in METRIC_LABELS.items()
            if key in values]
    for key, label, unit in (("fps", "FPS", ""), ("anchors", "anchors", ""),
                             ("num_views", "test views", ""),
                             ("peak_memory_mb", "peak memory", " MB")):
        if metrics.get(key) is not None:
            rows.append(f"| {label} | {metrics[key]:.4g}{unit} |")
    header = f"mode `{metrics.get('mode', '?')}`, {metrics.get('device', '?')}\n\n"
    return header + "| metric | value |\n|---|---|\n" + "\n".join(rows)
