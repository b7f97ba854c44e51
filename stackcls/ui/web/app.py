"""The HTTP side of `stackcls serve`: routes, the token guard, pages.

Safety, by construction rather than by filtering:
- every request needs the token (in the URL once, then a cookie named after the token's hash, so
  two servers on one host keep their own); a state-changing request needs it in a header too, which
  a page of another origin cannot set without CORS, which this server never grants;
- no route takes a path: stacks, slices and frames are integers, overlays one of a fixed set, and
  static files are a dict read from the package at start;
- pages are Jinja templates with autoescape; data reaches the scripts as escaped JSON and is put on
  the page with textContent, never innerHTML; a Content-Security-Policy forbids inline script, so
  even a missed escape could not run one.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Literal

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from stackcls import CLASSES
from stackcls.ui.label_session import LabelsConflictError
from stackcls.ui.web.state import FLAGS, STATUSES, AppState

HERE = Path(__file__).parent
HEADER = "X-Stackcls-Token"
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _static() -> dict[str, tuple[bytes, str]]:
    out = {}
    for p in sorted((HERE / "static").iterdir()):
        if p.suffix in STATIC_TYPES:
            out[p.name] = (p.read_bytes(), STATIC_TYPES[p.suffix])
    return out


def _same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode("utf-8", "replace"), b.encode())


def create_app(root, labels=None, model=None, token: str | None = None, masks=None,
               state: AppState | None = None) -> FastAPI:
    """The ASGI app. `model`: None or "default" (the shipped model), "none" (labelling only), a
    run folder, or a model object. `token`: None draws a random one (`app.state.token`)."""
    import secrets

    token = token or secrets.token_urlsafe(24)
    st = state or AppState(root, labels=labels, model=model, masks=masks)
    cookie = "stackcls_" + hashlib.sha256(token.encode()).hexdigest()[:12]
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    static = _static()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.token, app.state.app_state = token, st

    @app.middleware("http")
    async def guard(request: Request, call_next):
        from_url = _same(request.query_params.get("token"), token)
        if not (from_url or _same(request.cookies.get(cookie), token)):
            given = "token" in request.query_params or cookie in request.cookies
            return PlainTextResponse(
                "forbidden: wrong token\n" if given else
                "unauthorized: open the URL (with ?token=...) that `stackcls serve` printed\n",
                status_code=403 if given else 401)
        if request.method not in ("GET", "HEAD") and not _same(request.headers.get(HEADER), token):
            return PlainTextResponse(f"forbidden: a change needs the {HEADER} header\n", 403)
        resp = await call_next(request)
        if from_url:
            resp.set_cookie(cookie, token, httponly=True, samesite="strict")
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"   # the token is in the first URL
        return resp

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc):
        # the reason, without echoing the request's input back
        where = "; ".join(".".join(str(x) for x in e.get("loc", ())) for e in exc.errors()[:5])
        return PlainTextResponse(f"bad request: {where}\n", status_code=400)

    @app.exception_handler(Exception)
    async def crashed(request, exc):
        return PlainTextResponse(f"server error: {type(exc).__name__}\n", status_code=500)

    def sid_ok(sid: int) -> int:
        if not 0 <= sid < len(st.stacks):
            raise HTTPException(404, "no such stack")
        return sid

    def png(request: Request, make) -> Response:
        try:
            data, etag = make()
        except (LookupError, IndexError, TypeError) as e:
            raise HTTPException(404, str(e)) from None
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/png", headers=headers)

    def page(name: str, **ctx) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(token=token, **ctx),
                            headers={"Cache-Control": "no-store"})

    # -- pages ------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def queue_page(status: Literal[("any",) + STATUSES] = "any",
                   flag: Literal[("any", "flagged", "none") + FLAGS] = "any"):
        return page("queue.html", root=st.root.name, labels=str(st.labels_path),
                    filters=dict(status=status, flag=flag), statuses=STATUSES, flags=FLAGS)

    @app.get("/stack/{sid}", response_class=HTMLResponse)
    def stack_page(sid: int):
        st.want(sid_ok(sid))
        return page("stack.html", data=stack_data(sid))

    # -- data -------------------------------------------------------------------------------
    @app.get("/api/queue")
    def api_queue():
        return JSONResponse(st.queue(), headers={"Cache-Control": "no-store"})

    def stack_data(sid: int) -> dict:
        s = st.stacks[sid]
        order = st.order()
        i = order.index(sid)
        labels = st.labels_of(sid)
        pos = None if s.positions is None else [round(float(v), 1) for v in s.positions]
        return dict(sid=sid, subject=s.subject, phase=s.phase, frame=s.frame, n=s.n_slices,
                    slice_ids=s.slice_ids, positions=pos,
                    sources=[Path(x).name for x in s.sources], labels=labels,
                    status=st.status(sid, labels), pred=st.pred_view(sid),
                    pred_error=st.pred_errors.get(sid), progress=st.progress(),
                    has_masks=st.has_masks(sid), has_cam=st.has_cam(), has_cine=st.has_cine(sid),
                    prev=order[i - 1] if i > 0 else None,
                    next=order[i + 1] if i + 1 < len(order) else None, position=i + 1,
                    total=len(order), classes=list(CLASSES))

    @app.get("/api/stack/{sid}")
    def api_stack(sid: int):
        st.want(sid_ok(sid))
        return JSONResponse(stack_data(sid), headers={"Cache-Control": "no-store"})

    @app.post("/api/stack/{sid}/edit")
    def api_edit(sid: int, op: Literal["first", "last", "range", "label", "set", "accept"] = Body(embed=True),
                 k: int | None = Body(None, embed=True), first: int | None = Body(None, embed=True),
                 last: int | None = Body(None, embed=True),
                 label: Literal[CLASSES] | None = Body(None, embed=True),
                 labels: list[Literal[CLASSES] | None] | None = Body(None, embed=True)):
        n = st.stacks[sid_ok(sid)].n_slices
        need = {"first": ("k",), "last": ("k",), "label": ("k", "label"), "range": ("first", "last"),
                "set": ("labels",), "accept": ()}[op]
        args = dict(k=k, first=first, last=last, label=label, labels=labels)
        if any(args[a] is None for a in need):
            raise HTTPException(400, f"{op} needs {', '.join(need)}")
        for a in ("k", "first", "last"):
            if a in need and not 0 <= args[a] < n:
                raise HTTPException(400, f"{a} must be a slice of this stack (0..{n - 1})")
        if op == "range" and first > last:
            raise HTTPException(400, "first must not be after last")
        if op == "set" and len(labels) != n:
            raise HTTPException(400, f"labels must hold {n} entries")
        try:
            out = st.edit(sid, op, **{a: args[a] for a in need})
        except LabelsConflictError as e:
            raise HTTPException(409, f"NOT SAVED: {e}") from None
        except OSError as e:     # a read-only folder, a full disk: say so, keep serving
            raise HTTPException(409, f"NOT SAVED: cannot write {st.labels_path}: "
                                     f"{e.strerror or type(e).__name__}") from None
        except LookupError as e:
            raise HTTPException(409, str(e)) from None
        return dict(labels=out, status=st.status(sid, out))

    # -- images -----------------------------------------------------------------------------
    @app.get("/img/{sid}/{k}")
    def img(request: Request, sid: int, k: int, overlay: Literal["none", "masks", "cam"] = "none"):
        sid_ok(sid)
        if not 0 <= k < st.stacks[sid].n_slices:
            raise HTTPException(404, "no such slice")
        make = {"none": st.slice_png, "masks": st.mask_png, "cam": st.cam_png}[overlay]
        return png(request, lambda: make(sid, k))

    @app.get("/api/cine/{sid}")
    def api_cine(sid: int):
        frames = st.cine(sid_ok(sid))
        return dict(frames=0 if frames is None else len(frames))

    @app.get("/cine/{sid}/{k}/{t}")
    def cine(request: Request, sid: int, k: int, t: int):
        frames = st.cine(sid_ok(sid))
        if frames is None or not 0 <= t < len(frames) or not 0 <= k < st.stacks[sid].n_slices:
            raise HTTPException(404, "no such frame")
        return png(request, lambda: st.cine_png(sid, k, t))

    @app.get("/static/{name}")
    def static_file(name: str):
        if name not in static:
            raise HTTPException(404, "no such file")
        data, kind = static[name]
        return Response(data, media_type=kind, headers={"Cache-Control": "private, max-age=60"})

    # -- export -----------------------------------------------------------------------------
    @app.get("/export/labels.csv")
    def export_labels():
        with st.lock:
            path = st.labels_path
            data = path.read_bytes() if path.is_file() else b"subject,frame,phase,slice,label\n"
        return Response(data, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="labels.csv"'})

    @app.get("/export/predictions.jsonl")
    def export_predictions():
        return Response(st.predictions_jsonl(), media_type="application/x-ndjson",
                        headers={"Content-Disposition": 'attachment; filename="predictions.jsonl"'})

    return app
