"""Real pictures for the crawl benchmark, and the two servers that serve them on 127.0.0.1.

Pictures come from Debian packages nobody here made, fetched once into a cache with `apt-get download` and
`dpkg-deb -x`: clip art from `openclipart-png` (flattened on white, as a web page shows it) and the wallpapers
of `gnome-backgrounds` (large WebP renders). Each is scaled so that its short side is the source size and
cropped to at most 4:3, then encoded as JPEG (q90), PNG or WebP (q90): real aspect ratios, real entropy.

Servers, each meant to run in its own process:
- `plain`: Python's `http.server.ThreadingHTTPServer` with its defaults (HTTP/1.0, a thread and a connection
  per request), the kind of server a user tries first, and much of the small web still is;
- `ours`: the world's aiohttp server (`pipeline.world.WorldServer`, keep-alive), serving the same bodies.
"""

from __future__ import annotations

import glob
import io
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

PACKAGES = {"openclipart-png": "usr/share/openclipart/png", "gnome-backgrounds": "usr/share/backgrounds/gnome"}
DEFAULT_CACHE = os.path.expanduser("~/.cache/pixelmill/dedup-bench")  # shared with bench/dedup.py
SAVE = {"jpg": ("JPEG", {"quality": 90}), "png": ("PNG", {}), "webp": ("WEBP", {"quality": 90})}


def fetch_debian(cache: str, packages: dict[str, str]) -> None:
    """Debian packages (name → the folder of pictures each installs) extracted under `cache`/x with
    `apt-get download` and `dpkg-deb -x`; what is already extracted there is reused."""
    os.makedirs(cache, exist_ok=True)
    missing = [p for p, folder in packages.items() if not os.path.isdir(os.path.join(cache, "x", folder))]
    if missing and not shutil.which("apt-get"):
        sys.exit(f"no apt-get here: fetch the Debian packages {' '.join(missing)} and dpkg-deb -x them into {cache}/x")
    for package in missing:
        debs = glob.glob(os.path.join(cache, f"{package}_*.deb"))
        if not debs:
            print(f"fetching {package}…", flush=True)
            done = subprocess.run(["apt-get", "download", package], cwd=cache, capture_output=True, text=True)
            if done.returncode:  # as root it also warns that the download is unsandboxed: harmless
                sys.exit(f"apt-get download {package} failed in {cache}: {done.stderr.strip()}")
            debs = glob.glob(os.path.join(cache, f"{package}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", sorted(debs)[-1], os.path.join(cache, "x")], check=True)


def load_pictures(cache: str, count: int, seed: int = 0) -> list[Image.Image]:
    """`count` distinct RGB pictures: every wallpaper, then clip art drawn at random (at least 200 px a side)."""
    fetch_debian(cache, PACKAGES)
    wallpapers = sorted(glob.glob(os.path.join(cache, "x", PACKAGES["gnome-backgrounds"], "*.webp")))
    clipart = sorted(glob.glob(os.path.join(cache, "x", PACKAGES["openclipart-png"], "**", "*.png"), recursive=True))
    random.Random(seed).shuffle(clipart)
    pictures = []
    for path in wallpapers + clipart:
        if len(pictures) == count:
            break
        try:
            with Image.open(path) as image:
                if min(image.size) < 200:
                    continue
                rgba = image.convert("RGBA")
        except Image.DecompressionBombError:  # a few clip arts are rendered at 15,000 px and more: skip them
            continue
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        pictures.append(Image.alpha_composite(white, rgba).convert("RGB"))
    return pictures


def source_body(picture: Image.Image, size: int, fmt: str) -> bytes:
    """The picture with its short side at `size`, cropped to at most 4:3, encoded as `fmt`."""
    w, h = picture.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    long_side = min(max(w, h), size * 4 // 3)
    target = (long_side, size) if w >= h else (size, long_side)
    left, top = (w - target[0]) // 2, (h - target[1]) // 2
    pw, ph = picture.size  # rounding above may reach a hair past the edge
    box = (left / scale, top / scale, min(pw, (left + target[0]) / scale), min(ph, (top + target[1]) / scale))
    image = picture.resize(target, Image.Resampling.LANCZOS, box=box)
    buffer = io.BytesIO()
    name, options = SAVE[fmt]
    image.save(buffer, format=name, **options)
    return buffer.getvalue()


class _Bodies(BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        try:
            body = self.bodies[int(self.path.rsplit("/", 1)[-1].split(".")[0]) % len(self.bodies)]
        except ValueError:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # one line per request on stderr would cost more than serving it
        pass


def serve(kind: str, bodies: list[bytes], n: int, ready) -> None:
    """Serve `bodies` as <base>/<i>.img for i < n (body i modulo their number) until killed; puts <base> on `ready`."""
    if kind == "plain":
        handler = type("Handler", (_Bodies,), {"bodies": bodies})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        ready.put(f"http://127.0.0.1:{server.server_address[1]}/i")
    else:
        from omegaconf import OmegaConf

        from pipeline.world import World, WorldServer

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        world = World(OmegaConf.load(os.path.join(root, "conf", "world", "default.yaml")))
        server = WorldServer(world, files={f"{i}.img": bodies[i % len(bodies)] for i in range(n)})
        server.start()
        ready.put(f"{server.base_url}/file")
    while True:
        time.sleep(3600)
