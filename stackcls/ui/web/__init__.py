"""`stackcls serve ROOT`: the review and labelling app in the browser (docs/web-app.md).

    app.py      routes, token guard, pages (FastAPI on uvicorn)
    state.py    stacks, the label session, predictions made once per stack in the background
    render.py   slices and overlays as cached PNGs
    effort.py   review effort: the share of stacks to check until 95 % of ranges are right
    templates/, static/   plain HTML, CSS and JS, no build step
"""

from __future__ import annotations

import sys
from pathlib import Path

from stackcls.train.calibration import review_effort

__all__ = ["create_app", "serve_command", "review_effort"]


def create_app(*args, **kwargs):
    # imported here: `review_effort` users (the study's results.json) need no web framework
    from stackcls.ui.web.app import create_app as make

    return make(*args, **kwargs)


def serve_command(root, labels=None, model=None, host: str = "127.0.0.1", port: int = 8765,
                  open_browser: bool = False, masks=None) -> int:
    """Serve ROOT until Ctrl-C. `model`: None or "default" (the shipped model), "none", or a run
    folder. Prints the URL with its token; returns the exit status."""
    import secrets

    try:
        import uvicorn
    except ImportError:
        print("error: `stackcls serve` needs fastapi, uvicorn and jinja2 (pip install stackcls)",
              file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(24)
    try:
        app = create_app(root, labels=labels, model=model, token=token, masks=masks)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    st = app.state.app_state
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: serving on {host}: anyone who can reach this machine on port {port} and "
              "learns the token can read these images and change the labels. The traffic is not "
              "encrypted. Prefer the default 127.0.0.1 and an SSH tunnel "
              f"(ssh -L {port}:127.0.0.1:{port} HOST).", file=sys.stderr)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/?token={token}"
    done, total = st.session.progress()
    print(f"{total} stacks, {done} labelled; labels are saved to {st.labels_path} after every change")
    beside = Path(root) / "labels.csv"
    if labels is None and beside.is_file():
        print(f"note: {beside} is not edited; pass --labels {beside} to show and edit it")
    print(f"open {url}", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        st.stop()
    return 0
