"""`stackcls serve`: review effort, the HTTP guard, and end-to-end runs in a real headless Chromium.

The browser tests drive Debian's chromium through /usr/bin/chromedriver (nothing is downloaded);
without them they skip and say why. A fast fake model stands in for the real one, except in one
test that serves the shipped default model. Screenshots go to the test's tmp folder
(STACKCLS_WEB_SHOTS=DIR puts them in DIR as well).
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from web_helpers import (FakeModel, Server, browser_missing, chromium, csv_labels,  # noqa: E402
                         expect_range, http, keys, open_stack, page_labels, saved, shot, wait)

pytest.importorskip("fastapi", reason="stackcls serve needs fastapi (pip install -e .)")
pytest.importorskip("uvicorn", reason="stackcls serve needs uvicorn (pip install -e .)")

from stackcls import load_labels, load_stacks  # noqa: E402
from stackcls.phantom import cohort  # noqa: E402
from stackcls.ui.web import create_app, review_effort  # noqa: E402
from stackcls.ui.web.state import AppState  # noqa: E402

HOSTILE = "<img src=x onerror=alert(1)>"
needs_browser = pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))


# ------------------------------------------------------------------------------ review effort

def brute_model_share(p, ok, target):
    """Check the k least sure stacks, for k = 0, 1, ...; count the right ranges one by one."""
    n = len(p)
    order = sorted(range(n), key=lambda i: (p[i], i))
    for k in range(n + 1):
        checked = set(order[:k])
        right = sum(1 for i in range(n) if i in checked or ok[i])
        if right >= target * n - 1e-9:
            return k / n
    return 1.0


def test_review_effort_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 40))
        p = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9], n) if trial % 3 == 0 else rng.random(n)
        ok = rng.random(n) < rng.random()
        triv = rng.random(n) < rng.random()
        target = float(rng.choice([0.5, 0.8, 0.95, 1.0]))
        e = review_effort(p, ok, triv, target)
        assert e["model"] == pytest.approx(brute_model_share(p, ok, target))
        assert e["n"] == n and e["p_model"] == pytest.approx(ok.mean())


def test_review_effort_random_order_is_the_expected_line():
    """Every order of a small cohort: the mean accuracy after k random checks is p0 + k/n (1 - p0),
    and (target - p0) / (1 - p0) is where that line reaches the target."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(2, 7))
        triv = rng.random(n) < 0.6
        p0 = triv.mean()
        for k in range(n + 1):
            accs = [sum(1 for j, i in enumerate(perm) if j < k or triv[i]) / n
                    for perm in itertools.permutations(range(n))]
            assert np.mean(accs) == pytest.approx(p0 + k / n * (1 - p0))
        for target in (0.5, 0.95):
            share = review_effort(np.zeros(n), triv, triv, target)["trivial"]
            assert share == pytest.approx(max(0.0, (target - p0) / (1 - p0)) if p0 < 1 else 0.0)


def test_review_effort_edges():
    assert review_effort([], [], [])["model"] is None
    e = review_effort([0.9, 0.2, 0.5], [True, False, True], [True, True, True])
    assert e["model"] == pytest.approx(1 / 3) and e["trivial"] == 0.0
    with pytest.raises(ValueError):
        review_effort([0.1], [True, False], [True])


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def data():
    root = cohort(2, seed=0)
    stacks = load_stacks(root / "dicom", masks=root / "masks")
    return root, stacks


@pytest.fixture(scope="module")
def fake():
    return FakeModel()     # one instance: its compiled programs are reused by every server


@pytest.fixture
def serve(data, fake, tmp_path):
    """serve(csv=None, stacks=None, model=fake) -> a running Server on a fresh labels CSV."""
    root, stacks = data
    servers = []

    def make(csv=None, stacks_=None, model=None):
        if csv is None:
            csv = tmp_path / f"labels{len(servers)}.csv"
            shutil.copy(root / "labels.csv", csv)
        # the stacks are read once per module; each server gets its own CSV and predictions
        st = AppState(root / "dicom", labels=csv, model=model or fake, stacks=stacks_ or stacks)
        app = create_app(root / "dicom", state=st)
        srv = Server(app)
        servers.append(srv)
        srv.wait_predicted()
        return srv

    yield make
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def driver():
    why = browser_missing()
    if why:
        pytest.skip(why)
    d = chromium()
    yield d
    d.quit()


# ------------------------------------------------------------------------------ browser tests

@needs_browser
def test_keyboard_labelling_survives_reload(serve, driver, data, tmp_path):
    from selenium.webdriver.common.keys import Keys
    srv = serve()
    st = srv.app.state.app_state
    stack = st.stacks[0]
    n = stack.n_slices
    open_stack(driver, srv, 0)
    keys(driver, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, "a", *[Keys.ARROW_RIGHT] * 6, "z")
    saved(driver)
    assert page_labels(driver) == expect_range(n, 2, 8)
    keys(driver, "3")                  # slice 8 -> OBS, then undo it
    saved(driver)
    assert page_labels(driver)[8] == "OBS"
    keys(driver, "u")
    saved(driver)
    shot(driver, "web-stack.png", tmp_path)
    driver.refresh()
    wait(driver, "return document.body.dataset.ready === '1'")
    assert page_labels(driver) == expect_range(n, 2, 8)
    assert csv_labels(st.labels_path, stack) == expect_range(n, 2, 8)
    # the mouse: click = first IN, shift-click = last IN, drag = both
    from selenium.webdriver.common.action_chains import ActionChains
    cards = driver.find_elements("css selector", ".slice")
    ActionChains(driver).click(cards[1]).perform()
    saved(driver)
    ActionChains(driver).key_down(Keys.SHIFT).click(cards[10]).key_up(Keys.SHIFT).perform()
    saved(driver)
    assert page_labels(driver) == expect_range(n, 1, 10)
    ActionChains(driver).click_and_hold(cards[3]).move_to_element(cards[6]).move_to_element(
        cards[9]).release(cards[9]).perform()
    saved(driver)
    assert page_labels(driver) == expect_range(n, 3, 9)
    assert csv_labels(st.labels_path, stack) == expect_range(n, 3, 9)


@needs_browser
def test_two_tabs_and_two_servers_keep_every_edit(serve, driver):
    from selenium.webdriver.common.keys import Keys
    a = serve()
    b = serve(csv=a.app.state.app_state.labels_path)      # a second person, same CSV
    st = a.app.state.app_state
    first = driver.current_window_handle
    open_stack(driver, a, 0)
    driver.switch_to.new_window("tab")
    tab2 = driver.current_window_handle
    open_stack(driver, a, 1)
    driver.switch_to.new_window("tab")
    tab3 = driver.current_window_handle
    open_stack(driver, b, 2)
    driver.switch_to.window(first)
    keys(driver, Keys.ARROW_RIGHT, "a")
    saved(driver)
    driver.switch_to.window(tab2)
    keys(driver, *[Keys.ARROW_RIGHT] * 5, "z")
    saved(driver)
    driver.switch_to.window(tab3)
    keys(driver, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, "a", Keys.ARROW_RIGHT, "z")
    saved(driver)
    s0, s1, s2 = st.stacks[0], st.stacks[1], st.stacks[2]
    before1 = st.session.labels_of(1)
    csv = st.labels_path
    assert csv_labels(csv, s0)[:2] == ["OAP", "IN"]
    assert csv_labels(csv, s1)[5] == "IN" and set(csv_labels(csv, s1)[6:]) == {"OBS"}
    assert csv_labels(csv, s2) == expect_range(s2.n_slices, 3, 4)
    assert before1[5] == "IN"
    # server a shows what server b saved
    driver.switch_to.window(tab2)
    open_stack(driver, a, 2)
    assert page_labels(driver) == expect_range(s2.n_slices, 3, 4)
    for h in (tab2, tab3):
        driver.switch_to.window(h)
        driver.close()
    driver.switch_to.window(first)


@needs_browser
def test_accept_the_model(serve, driver, tmp_path):
    srv = serve()
    st = srv.app.state.app_state
    open_stack(driver, srv, 3)
    keys(driver, "y")
    saved(driver)
    want = list(st.preds[3].labels)
    assert page_labels(driver) == want
    assert driver.find_element("id", "status").text == "agreed"
    assert csv_labels(st.labels_path, st.stacks[3]) == want
    driver.find_element("id", "o-masks").click()          # an overlay, for the screenshot
    wait(driver, "return [...document.querySelectorAll('.ov')].every(i => !i.hidden && i.complete)")
    shot(driver, "web-stack-masks.png", tmp_path)
    keys(driver, "c")                                      # the cine of the selected slice plays
    wait(driver, "return !!document.querySelector('.slice.playing .base')?.src.includes('/cine/3/0/')")
    keys(driver, "c")
    wait(driver, "return !document.querySelector('.slice.playing')")


@needs_browser
def test_queue_is_least_sure_first(serve, driver, tmp_path):
    srv = serve()
    st = srv.app.state.app_state
    driver.get(srv.url("/"))
    wait(driver, "return document.body.dataset.ready === 'done'")
    order = [int(x) for x in driver.execute_script(
        "return [...document.querySelectorAll('#queue tbody tr')].map(r => r.dataset.sid)")]
    probs = [st.preds[s].range_probability for s in order]
    assert len(order) == len(st.stacks) and probs == sorted(probs)
    assert driver.find_element("id", "progress-text").text.endswith(f"{len(order)} / {len(order)} stacks")
    assert not driver.find_element("id", "effort").get_attribute("hidden")
    shot(driver, "web-queue.png", tmp_path)
    from selenium.webdriver.support.ui import Select
    Select(driver.find_element("id", "f-status")).select_by_value("agreed")
    n_agreed = sum(r["status"] == "agreed" for r in st.queue()["rows"])
    assert len(driver.find_elements("css selector", "#queue tbody tr")) == n_agreed
    assert "status=agreed" in driver.current_url


@needs_browser
def test_hostile_patient_id_is_text(data, fake, driver, tmp_path):
    import pydicom
    root, _ = data
    src = root / "dicom" / "syn0001"
    dst = tmp_path / "dicom" / "evil"
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientID = HOSTILE
        ds.PatientName = HOSTILE
        ds.save_as(dst / f.name)
    app = create_app(tmp_path / "dicom", labels=tmp_path / "labels.csv", model=fake)
    srv = Server(app)
    try:
        srv.wait_predicted()
        assert any(s.subject == HOSTILE for s in app.state.app_state.stacks)
        driver.get(srv.base + "/")                     # no token yet in this server's cookie
        assert "unauthorized" in driver.find_element("tag name", "body").text
        for path in ("/", "/stack/0"):
            driver.get(srv.url(path))
            wait(driver, "return !!document.body.dataset.ready && document.body.dataset.ready !== 'partial'")
            from selenium.common.exceptions import NoAlertPresentException
            with pytest.raises(NoAlertPresentException):
                driver.switch_to.alert.text
            assert HOSTILE in driver.find_element("tag name", "body").text
            assert not driver.execute_script(
                "return [...document.images].some(i => i.getAttribute('src') === 'x')")
        assert HOSTILE in driver.title
    finally:
        srv.close()


@needs_browser
def test_server_survives_malformed_requests(serve, driver):
    srv = serve()
    garbage = [b"\x00\xff\xfe garbage\r\n\r\n", b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
               b"POST /api/stack/0/edit HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\n\r\n{",
               b"GET / HTTP/9.9\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n"]
    for g in garbage:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(g)
            s.shutdown(socket.SHUT_WR)
            try:
                s.recv(1024)
            except OSError:
                pass
    for body in (b"{not json", b"[]", b'{"op": "range", "first": "<script>", "last": 2}',
                 b'{"op": "label", "k": 99999999999999999999999, "label": "IN"}',
                 b'{"op": "set", "labels": ["IN"]}', b'{"op": "eval"}'):
        code, _ = http(srv, "/api/stack/0/edit", body, token=True)
        assert 400 <= code < 500, body
    open_stack(driver, srv, 0)
    keys(driver, "a")
    saved(driver)
    assert page_labels(driver)[0] == "IN"


# ------------------------------------------------------------------------------ HTTP guard

def test_token_is_required(serve):
    srv = serve()
    for path in ("/", "/stack/0", "/api/queue", "/img/0/0", "/static/app.css", "/export/labels.csv",
                 "/nonexistent"):
        code, _ = http(srv, path)
        assert code == 401, path
        code, _ = http(srv, path + "?token=wrong")
        assert code == 403, path
    assert http(srv, "/api/queue", cookie=True)[0] == 200
    assert http(srv, "/", query=True)[0] == 200
    edit = json.dumps({"op": "first", "k": 1}).encode()
    assert http(srv, "/api/stack/0/edit", edit, cookie=True)[0] == 403      # cookie alone: no
    assert http(srv, "/api/stack/0/edit", edit, query=True)[0] == 403       # URL token alone: no
    assert http(srv, "/api/stack/0/edit", edit, token=True)[0] == 200


def test_paths_in_parameters_are_refused(serve):
    srv = serve()
    evil = ["../../../../etc/passwd", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd",
            "..\\..\\windows", "C:%5Cwindows"]
    for e in evil:
        for path in (f"/stack/{e}", f"/api/stack/{e}", f"/img/{e}/0", f"/img/0/{e}",
                     f"/img/0/0?overlay={e}", f"/cine/0/0/{e}", f"/cine/{e}/0/0", f"/api/cine/{e}",
                     f"/static/{e}", "/static/..%2Fapp.py", f"/?status={e}", f"/?flag={e}",
                     f"/export/{e}"):
            code, body = http(srv, path, cookie=True)
            assert 400 <= code < 500, (path, code)
            assert b"root:" not in body and b"import" not in body
        for field in ("k", "first", "label", "labels"):
            code, _ = http(srv, "/api/stack/0/edit", json.dumps({"op": "first", field: e}).encode(),
                           token=True)
            assert 400 <= code < 500, field
    assert http(srv, "/img/0/0", cookie=True)[0] == 200


def test_png_cache_etag(serve):
    srv = serve()
    code, body = http(srv, "/img/0/3", cookie=True)
    assert code == 200 and body[:4] == b"\x89PNG"
    t = srv.app.state.token
    import hashlib
    req = urllib.request.Request(srv.base + "/img/0/3")
    req.add_header("Cookie", f"stackcls_{hashlib.sha256(t.encode()).hexdigest()[:12]}={t}")
    with urllib.request.urlopen(req) as r:
        etag = r.headers["ETag"]
    req.add_header("If-None-Match", etag)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 304


def test_exports_read_back(serve, tmp_path):
    srv = serve()
    code, body = http(srv, "/export/labels.csv", cookie=True)
    (tmp_path / "out.csv").write_bytes(body)
    assert code == 200 and len(load_labels(tmp_path / "out.csv")) > 0
    code, body = http(srv, "/export/predictions.jsonl", cookie=True)
    recs = [json.loads(line) for line in body.decode().splitlines()]
    assert code == 200 and len(recs) == len(srv.app.state.app_state.stacks)
    assert all("range_probability" in r for r in recs)


def test_labels_never_go_into_root_by_default(data, fake, tmp_path, monkeypatch):
    root, stacks = data
    monkeypatch.chdir(tmp_path)
    st = AppState(root / "dicom", model="none", stacks=stacks, start=False)
    assert st.labels_path == tmp_path / "review_labels.csv"
    st.edit(0, "first", k=1)
    assert st.labels_path.is_file() and not (root / "dicom" / "review_labels.csv").exists()


@pytest.mark.slow
def test_default_model_serves_a_cohort(data, serve):
    """The shipped model on the synthetic cohort: predictions made once, in the background."""
    t0 = time.time()
    srv = serve(model="default")
    st = srv.app.state.app_state
    assert st.progress()["model"] == "done", st.progress()
    assert len(st.preds) == len(st.stacks)
    q = json.loads(http(srv, "/api/queue", cookie=True)[1])
    probs = [r["range_probability"] for r in q["rows"]]
    assert probs == sorted(probs) and q["effort"]["n"] == len(st.stacks)
    assert time.time() - t0 < 120
