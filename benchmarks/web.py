"""`stackcls serve`: one labelling step in a real headless Chromium, against the 300 ms target.

    python benchmarks/web.py [--stacks 20] [--slices 12] [--model fake|default]

A step is what a person does a hundred times in a sitting: the stack page opens (every slice image
loaded), a click sets the first IN slice, a shift-click the last, `n` opens the next stack of the
queue. Timed from the moment the page starts loading to the moment the next page starts loading
(the two saves included: `n` waits for them). The first step is left out (browser and server
warming up); prints the median, the 90th percentile and the worst of the rest beside the target.

The stacks are the phantom cohort's, cut to --slices slices and copied under new names; the model's
predictions are computed before timing starts (the server does them once, in the background): the
fake model by default, `--model default` for the shipped one (slower start, same step). Needs
Debian's chromium and chromium-driver (never downloaded).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TARGET_MS = 300.0


def stacks_for(n_stacks: int, n_slices: int):
    from stackcls import Stack, load_stacks
    from stackcls.phantom import cohort

    root = cohort(2, seed=0)
    base = load_stacks(root / "dicom")
    out = []
    for i in range(n_stacks):
        s = base[i % len(base)]
        k = min(n_slices, s.n_slices)
        out.append(Stack(images=s.images[:k].copy(), sources=s.sources[:k], subject=f"bench{i:03d}",
                         phase=s.phase, frame=s.frame, positions=None if s.positions is None
                         else s.positions[:k], orientation_known=s.orientation_known))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stacks", type=int, default=20)
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--model", choices=("fake", "default"), default="fake")
    args = ap.parse_args(argv)

    from web_helpers import FakeModel, Server, browser_missing, chromium

    why = browser_missing()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from stackcls.ui.web import create_app
    from stackcls.ui.web.state import AppState

    stacks = stacks_for(args.stacks, args.slices)
    with tempfile.TemporaryDirectory() as tmp:
        st = AppState(tmp, labels=Path(tmp) / "labels.csv", stacks=stacks,
                      model=FakeModel() if args.model == "fake" else "default")
        srv = Server(create_app(tmp, state=st))
        t0 = time.perf_counter()
        srv.wait_predicted(timeout=600)
        # the server also renders every slice ahead once predictions are done; let it finish
        while any(("slice", sid, k) not in st.pngs for sid in range(len(stacks))
                  for k in range(stacks[sid].n_slices)):
            time.sleep(0.05)
        print(f"{len(stacks)} stacks of {args.slices} slices; predictions and images ready in "
              f"{time.perf_counter() - t0:.1f} s ({args.model} model)")
        driver = chromium()
        try:
            wait = WebDriverWait(driver, 30, poll_frequency=0.005)
            ready = ("return document.body.dataset.ready === '1' && [...document.images]"
                     ".every(i => i.hidden || (i.complete && i.naturalWidth > 0))")
            first = st.order()[0]
            steps = []
            t = time.perf_counter()
            driver.get(srv.url(f"/stack/{first}"))
            for _ in range(len(stacks) - 1):
                wait.until(lambda d: d.execute_script(ready))
                sid = driver.execute_script("return JSON.parse(document.getElementById('boot').textContent).sid")
                cards = driver.find_elements("css selector", ".slice")
                ActionChains(driver, duration=0).click(cards[2]).key_down(Keys.SHIFT).click(cards[9]) \
                    .key_up(Keys.SHIFT).send_keys("n").perform()
                wait.until(lambda d: d.execute_script(
                    "return document.body.dataset.ready === '1' && JSON.parse("
                    f"document.getElementById('boot').textContent).sid !== {sid}"))
                now = time.perf_counter()
                steps.append(1000 * (now - t))
                t = now
                labs = st.labels_of(sid)
                assert labs[2] == "IN" and labs[9] == "IN" and labs[1] == "OAP" and labs[10] == "OBS", labs
        finally:
            driver.quit()
            srv.close()
    rest = steps[1:]
    q = statistics.quantiles(rest, n=10)[-1] if len(rest) >= 2 else rest[0]
    print(f"first step {steps[0]:.0f} ms (warm-up, left out)")
    print(f"per step after the first, {len(rest)} steps: median {statistics.median(rest):.0f} ms, "
          f"p90 {q:.0f} ms, worst {max(rest):.0f} ms   target < {TARGET_MS:.0f} ms   "
          f"{'MET' if statistics.median(rest) < TARGET_MS else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
