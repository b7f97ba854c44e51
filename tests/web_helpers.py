"""Helpers of tests/test_web_app.py and benchmarks/web.py: a fast fake model, a server in a thread,
and Debian's headless Chromium through Selenium (never downloaded)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


class FakeModel:
    """The `predict_stack` contract (`preprocess`, `slice_outputs`) at no JAX compile cost worth
    speaking of: OAP near the apex, OBS near the base, IN between, sharper for brighter stacks so
    `range_probability` differs from stack to stack."""

    def preprocess(self, images):
        x = np.asarray(images, np.float32)
        x = x / (np.abs(x).max() + 1e-6)
        return x[:, ::8, ::8, None]

    def slice_outputs(self, x):
        import jax
        import jax.numpy as jnp

        S = x.shape[0]
        u = jnp.linspace(0.0, 1.0, S)
        m = jnp.mean(x)
        sharp = 6.0 + 30.0 * m
        logits = jnp.stack([sharp * (0.2 - u), jnp.zeros(S), sharp * (u - 0.8)], 1)
        feats = jnp.stack([u, u ** 2, jnp.full(S, m), jnp.sin(u)], 1)
        return feats, jax.nn.softmax(logits, axis=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="error", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 20:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/") -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base}{path}{sep}token={self.app.state.token}"

    def wait_predicted(self, timeout: float = 120) -> None:
        st = self.app.state.app_state
        t0 = time.time()
        while st.progress()["model"] not in ("done", "none", "failed"):
            if time.time() - t0 > timeout:
                raise TimeoutError(f"predictions not done: {st.progress()}")
            time.sleep(0.05)

    def close(self) -> None:
        self.app.state.app_state.stop()
        self.server.should_exit = True
        self.thread.join(10)


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for p, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not p.exists():
            return f"{p} missing: apt-get install -y {pkg} (the browser is never downloaded)"
    return None


def chromium(width: int = 1400, height: int = 1000):
    """A fresh headless Chromium; its profile folder is removed when the driver quits."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="stackcls-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(a)
    # Selenium Manager would try to download a driver; the service names Debian's
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    quit_ = driver.quit

    def quit_and_clean():
        try:
            quit_()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    driver.quit = quit_and_clean
    return driver


# ------------------------------------------------------------------------- driving the pages

def shot(driver, name, tmp_path):
    path = tmp_path / name
    driver.save_screenshot(str(path))
    extra = os.environ.get("STACKCLS_WEB_SHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / name)
    return path


def wait(driver, cond, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(cond))


def open_stack(driver, srv, sid):
    driver.get(srv.url(f"/stack/{sid}"))
    wait(driver, "return document.body.dataset.ready === '1'")


def saved(driver):
    wait(driver, "return document.body.dataset.pending === '0'")
    assert "NOT SAVED" not in driver.find_element("id", "msg").text


def page_labels(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('.slice')].map(c => c.dataset.label || null)")


def keys(driver, *ks):
    from selenium.webdriver.common.action_chains import ActionChains
    a = ActionChains(driver)
    for k in ks:
        a.send_keys(k)
    a.perform()


def csv_labels(csv, stack):
    from stackcls import load_labels

    rows = {(r.subject, r.phase, r.frame, int(r.slice)): r.label for r in load_labels(csv)}
    return [rows.get((stack.subject, stack.phase, stack.frame, sid)) for sid in stack.slice_ids]


def expect_range(n, first, last):
    return ["OAP" if k < first else "IN" if k <= last else "OBS" for k in range(n)]


def http(srv, path, body=None, token=False, cookie=False, query=False):
    url = srv.base + path
    if query:
        url += ("&" if "?" in path else "?") + "token=" + srv.app.state.token
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    t = srv.app.state.token
    if token:
        req.add_header("X-Stackcls-Token", t)
        cookie = True
    if cookie:
        req.add_header("Cookie", f"stackcls_{hashlib.sha256(t.encode()).hexdigest()[:12]}={t}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
