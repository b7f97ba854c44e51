"""Where ImageNet weight files come from: the registry's declarations, the file shipped in the
package, the caches, and the download (against a loopback HTTP server, allowed by the test-only
STACKCLS_TEST_LOOPBACK_HTTP=1; no internet needed). Supply chain: https only, no downgrade by
redirect, pinned hashes checked on download and on every cached use, unpinned files warned about
and checked to be Keras HDF5 weight files."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import inspect
import io
import threading
import urllib.request
import warnings
from pathlib import Path

import h5py

import jax
import numpy as np
import pytest
from flax import nnx

from stackcls.models import backbones as B
from stackcls.models.backbones import download as D
from stackcls.models.backbones.layers import keras_layers

# Deterministic bytes: pytest-xdist workers must collect the same parametrised ids.
BODY = np.random.default_rng(0).bytes(300_000)
MD5 = hashlib.md5(BODY).hexdigest()
SHA = hashlib.sha256(BODY).hexdigest()


def _h5_bytes() -> bytes:
    """A minimal legacy Keras weight file, as bytes (what an unpinned download must look like)."""
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        g = f.create_group("dense")
        g.attrs["weight_names"] = [b"dense/kernel:0"]
        g["dense/kernel:0"] = np.ones((2, 3), "f4")
    return buf.getvalue()


H5 = _h5_bytes()
H5_SHA = hashlib.sha256(H5).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):
        Handler.hits.append(self.path)
        if self.path == "/good.h5":
            body, length = BODY, len(BODY)
        elif self.path == "/truncated.h5":
            body, length = BODY[:100_000], len(BODY)  # promises more than it sends
        elif self.path == "/weights.h5":
            body, length = H5, len(H5)
        elif self.path.startswith("/redirect/"):  # /redirect/<target URL without "http://">
            self.send_response(302)
            self.send_header("Location", "http://" + self.path[len("/redirect/"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.close_connection = True
            return
        elif self.path == "/corrupt.h5":
            body = bytearray(BODY)
            body[1234] ^= 0xFF
            body, length = bytes(body), len(BODY)
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("STACKCLS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STACKCLS_OFFLINE", raising=False)
    monkeypatch.setenv(D.LOOPBACK_HTTP_ENV, "1")  # the loopback server speaks plain http
    monkeypatch.setattr(D, "_WARNED", set())
    return tmp_path / "keras" / "models", tmp_path / "cache" / "weights"


@pytest.mark.parametrize("kind", ["md5", "sha256", "unpinned"])
def test_good_download_then_cached(server, dirs, kind):
    _, cache = dirs
    path, body, file_hash = {"md5": ("/good.h5", BODY, MD5), "sha256": ("/good.h5", BODY, SHA),
                             "unpinned": ("/weights.h5", H5, None)}[kind]
    wf = D.WeightFile("w.h5", server + path, file_hash)
    assert wf.verified == (file_hash is not None)
    Handler.hits.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        p = D.fetch(wf, progress=False)
        assert p == cache / "w.h5" and p.read_bytes() == body
        assert D.fetch(wf, progress=False) == p
    assert Handler.hits == [path]  # second call served from the cache
    assert sorted(x.name for x in cache.iterdir()) == ["w.h5"]  # no temp files left
    unverified = [str(x.message) for x in w if x.category is D.UnverifiedWeightsWarning]
    if file_hash is None:  # once, naming the file and its sha256 so that it can be pinned
        assert len(unverified) == 1 and "w.h5" in unverified[0] and H5_SHA in unverified[0]
    else:
        assert unverified == []


def test_keras_cache_comes_first(server, dirs):
    keras_models, cache = dirs
    keras_models.mkdir(parents=True)
    (keras_models / "w.h5").write_bytes(BODY)
    Handler.hits.clear()
    assert D.fetch(D.WeightFile("w.h5", server + "/good.h5", MD5)) == keras_models / "w.h5"
    assert Handler.hits == []


@pytest.mark.parametrize("path,match", [("/truncated.h5", "truncated"),
                                        ("/corrupt.h5", "does not match its pinned md5"),
                                        ("/missing.h5", "HTTP 404")])
def test_bad_downloads_leave_nothing(server, dirs, path, match):
    _, cache = dirs
    with pytest.raises(D.WeightsUnavailableError, match=match):
        D.fetch(D.WeightFile("w.h5", server + path, MD5), progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []


@pytest.mark.parametrize("file_hash", [SHA, None], ids=["pinned", "unpinned"])
def test_junk_cached_file_is_refused_offline(dirs, monkeypatch, file_hash):
    """Pinned: checked against its hash; unpinned: must be a Keras HDF5 weight file. Offline,
    a clear error naming the file (left in place)."""
    _, cache = dirs
    cache.mkdir(parents=True)
    (cache / "w.h5").write_bytes(BODY[:-1])
    monkeypatch.setenv("STACKCLS_OFFLINE", "1")
    match = "does not match its pinned sha256" if file_hash else "is not a readable HDF5 file"
    with pytest.raises(D.WeightsUnavailableError, match=rf"weights/w\.h5 {match}.*delete it"):
        D.fetch(D.WeightFile("w.h5", "https://127.0.0.1:9/w.h5", file_hash))
    assert (cache / "w.h5").read_bytes() == BODY[:-1]


@pytest.mark.parametrize("file_hash", [SHA, None], ids=["pinned", "unpinned"])
def test_junk_cached_file_is_replaced_online(server, dirs, file_hash):
    """Online, junk in our cache is deleted (with a warning) and downloaded again; junk in
    Keras's cache is ignored, not deleted."""
    keras_models, cache = dirs
    for d in (keras_models, cache):
        d.mkdir(parents=True)
        (d / "w.h5").write_bytes(b"junk")
    path, body = ("/good.h5", BODY) if file_hash else ("/weights.h5", H5)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        p = D.fetch(D.WeightFile("w.h5", server + path, file_hash), progress=False)
    assert p == cache / "w.h5" and p.read_bytes() == body
    said = [str(x.message) for x in w if x.category is UserWarning]
    assert said[0].startswith(f"{keras_models / 'w.h5'} ") and "ignoring it" in said[0]
    assert said[1].startswith(f"{cache / 'w.h5'} ") and "deleted it" in said[1]
    assert (keras_models / "w.h5").read_bytes() == b"junk"


def test_unpinned_download_must_be_hdf5(server, dirs):
    _, cache = dirs
    with pytest.raises(D.WeightsUnavailableError, match=r"good\.h5 is not a readable HDF5 file"):
        D.fetch(D.WeightFile("w.h5", server + "/good.h5"), progress=False)
    assert list(cache.iterdir()) == []


def test_http_is_refused_before_connecting(server, dirs, monkeypatch):
    """https only: without the test override, and for any host but 127.0.0.1 with it."""
    Handler.hits.clear()
    monkeypatch.delenv(D.LOOPBACK_HTTP_ENV)
    with pytest.raises(D.WeightsUnavailableError, match=r"refusing to download http://127.*https only"):
        D.fetch(D.WeightFile("w.h5", server + "/good.h5", SHA), progress=False)
    monkeypatch.setenv(D.LOOPBACK_HTTP_ENV, "1")
    local = server.replace("127.0.0.1", "localhost")
    with pytest.raises(D.WeightsUnavailableError, match="https only"):
        D.fetch(D.WeightFile("w.h5", local + "/good.h5", SHA), progress=False)
    assert Handler.hits == []


def test_redirect_to_http_is_refused(server, dirs):
    """A redirect is followed only to a URL that may be fetched itself (loopback server: to
    http://localhost, which the test override does not allow), and never from https to http."""
    _, cache = dirs
    Handler.hits.clear()
    target = server.replace("http://127.0.0.1", "localhost") + "/good.h5"
    with pytest.raises(D.WeightsUnavailableError, match=r"http://localhost.*redirected from.*https only"):
        D.fetch(D.WeightFile("w.h5", server + "/redirect/" + target, SHA), progress=False)
    assert Handler.hits == ["/redirect/" + target]  # the target was never requested
    assert list(cache.iterdir()) == []
    handler = D._HttpsOnlyRedirects()
    req = urllib.request.Request("https://example.org/w.h5")
    with pytest.raises(D.WeightsUnavailableError, match="redirected from https://example.org"):
        handler.redirect_request(req, io.BytesIO(), 302, "Found", {}, server + "/good.h5")
    new = handler.redirect_request(req, io.BytesIO(), 302, "Found", {}, "https://example.org/x.h5")
    assert new.full_url == "https://example.org/x.h5"


def test_offline_error_says_where_to_put_the_file(dirs, monkeypatch):
    keras_models, cache = dirs
    wf = B.spec("vgg16").weight_file()
    # nothing listens on port 9 of the loopback interface: connection refused
    wf = D.WeightFile(wf.fname, "http://127.0.0.1:9/" + wf.fname, wf.file_hash)
    assert wf.verified
    with pytest.raises(D.WeightsUnavailableError) as e:
        D.fetch(wf, progress=False)
    msg = str(e.value)
    assert wf.fname in msg and str(keras_models / wf.fname) in msg and str(cache / wf.fname) in msg
    monkeypatch.setenv("STACKCLS_OFFLINE", "1")
    with pytest.raises(D.WeightsUnavailableError, match="STACKCLS_OFFLINE"):
        D.fetch(wf)


def test_weight_file_names_follow_keras():
    base = "https://storage.googleapis.com/tensorflow/keras-applications/"

    def wf(name, input_size=None, **options):
        return B.spec(name).weight_file(input_size, **options)

    assert wf("vgg16") == D.WeightFile(
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        base + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc")
    assert wf("mobilenet").fname == "mobilenet_2_5_224_tf_no_top.h5"
    assert wf("mobilenet", 160, alpha=0.5).url == base + "mobilenet/mobilenet_5_0_160_tf_no_top.h5"
    assert wf("mobilenet", 100) == wf("mobilenet", 224)  # no 100 file: 224, as Keras
    assert wf("mobilenet_v2", 96).fname == \
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"
    assert wf("mobilenet_v2", 224, alpha=1.4).fname == \
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.4_224_no_top.h5"
    assert wf("nasnet_mobile").fname == "nasnet_mobile_no_top.h5"
    assert wf("nasnet_mobile").url.endswith("nasnet/NASNet-mobile-no-top.h5")
    for n in ("inception_v3", "resnet50_v2", "inception_resnet_v2", "densenet121", "xception"):
        f = wf(n)
        assert f.url.startswith(base) and f.url.endswith(f.fname) and len(f.file_hash) == 32
    with pytest.raises(ValueError, match="alpha"):
        wf("mobilenet", alpha=0.3)
    with pytest.raises(ValueError, match="no ImageNet weights"):
        wf("cbr_tiny")
    # one packaged file: MobileNet alpha 0.25 at 224, with its sha256
    packaged = [(n, f) for n in B.names() for f in B.spec(n).pretrained if f.packaged]
    assert [(n, f.fname, len(f.file_hash)) for n, f in packaged] == \
        [("mobilenet", "mobilenet_2_5_224_tf_no_top.h5", 64)]


def test_verified_flag_names_every_unpinned_file():
    """Every declared file is pinned (verified) except the 45 MobileNet/MobileNetV2 files for
    which Keras publishes no hash and we hold no copy; all are https."""
    files = [(n, f) for n in B.names() for f in B.spec(n).pretrained]
    assert all(f.url.startswith("https://") for _, f in files)
    unverified = [(n, f.fname) for n, f in files if not f.verified]
    assert len(unverified) == 45 and len(files) == 46 + 7
    assert {n for n, _ in unverified} == {"mobilenet", "mobilenet_v2"}
    assert ("mobilenet", "mobilenet_2_5_224_tf_no_top.h5") not in unverified


def test_pinned_md5s_are_published_by_keras():
    """Each md5 we pin appears in Keras's application sources (read as text; no keras import)."""
    found = importlib.util.find_spec("keras")
    if found is None:
        pytest.skip("keras (optional test extra) is not installed")
    apps = Path(found.origin).parent / "src" / "applications"
    text = "".join(p.read_text() for p in apps.glob("*.py"))
    md5s = [f for n in B.names() for f in B.spec(n).pretrained if f.verified and not f.packaged]
    assert len(md5s) == 7
    for f in md5s:
        assert len(f.file_hash) == 32 and f'"{f.file_hash}"' in text, f.fname


def test_weight_files_are_the_ones_keras_downloads():
    """URLs and md5s as Keras's own application modules state them."""
    keras = pytest.importorskip("keras")  # optional test extra; the rest of the module runs without
    apps = keras.src.applications
    wf = B.spec("resnet50_v2").weight_file()
    assert wf.file_hash == apps.resnet.WEIGHTS_HASHES["resnet50v2"][1]
    assert wf.url == apps.resnet.BASE_WEIGHTS_PATH + wf.fname
    wf = B.spec("densenet121").weight_file()
    assert wf.url == apps.densenet.DENSENET121_WEIGHT_PATH_NO_TOP
    assert f'"{wf.fname}",\n{" " * 20}DENSENET121_WEIGHT_PATH_NO_TOP,' in \
        inspect.getsource(apps.densenet)
    assert f'file_hash="{wf.file_hash}"' in inspect.getsource(apps.densenet.DenseNet)
    wf = B.spec("xception").weight_file()
    assert wf.url == apps.xception.WEIGHTS_PATH_NO_TOP
    assert f'file_hash="{wf.file_hash}"' in \
        inspect.getsource(apps.xception.Xception).split("else:")[-1]
    wf = B.spec("mobilenet").weight_file(128, alpha=0.75)
    assert wf.url == apps.mobilenet.BASE_WEIGHT_PATH + "mobilenet_7_5_128_tf_no_top.h5"


@pytest.fixture()
def no_network(tmp_path, monkeypatch):
    """Empty HOME and STACKCLS_CACHE, no KERAS_HOME, downloads refused twice over."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STACKCLS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.setenv("STACKCLS_OFFLINE", "1")

    def refuse(*a, **k):
        raise AssertionError("network access")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(urllib.request.OpenerDirector, "open", refuse)
    return tmp_path


def _values(model):
    return {n: [np.asarray(v[...]) for v in layer.keras_weights()]
            for n, layer in keras_layers(model).items()}


def test_packaged_mobilenet_needs_no_network_or_cache(no_network, shared_mobilenet_weights):
    """weights=imagenet for MobileNet 0.25 is the packaged file: no network, no cache written,
    the same arrays as loading the shared copy of the Keras file explicitly."""
    wf = B.spec("mobilenet").weight_file(224, alpha=0.25)
    assert D.fetch(wf) == D.PACKAGED_DIR / wf.fname
    assert D.file_digest(D.PACKAGED_DIR / wf.fname, "sha256") == \
        D.file_digest(shared_mobilenet_weights, "sha256") == wf.file_hash
    packaged = B.create("mobilenet", weights="imagenet", alpha=0.25)
    shared = B.create("mobilenet", weights=shared_mobilenet_weights)
    a, b = _values(packaged), _values(shared)
    assert a.keys() == b.keys() and len(a) == 54
    for k in a:
        for x, y in zip(a[k], b[k]):
            np.testing.assert_array_equal(x, y)
    assert np.any(a["conv1"][0] != _values(B.create("mobilenet", weights=None))["conv1"][0])
    small = B.create("mobilenet", weights="imagenet", input_size=100)  # no 100 file: 224's
    np.testing.assert_array_equal(small.conv1.kernel[...], packaged.conv1.kernel[...])
    assert sorted(p.name for p in no_network.iterdir()) == []  # nothing cached, nothing created
    with pytest.raises(D.WeightsUnavailableError, match="STACKCLS_OFFLINE"):
        B.create("mobilenet", weights="imagenet", alpha=0.5)  # not packaged: cache or download


def test_damaged_packaged_file_is_refused(tmp_path, monkeypatch):
    wf = B.spec("mobilenet").weight_file()
    (tmp_path / wf.fname).write_bytes(b"not the weights")
    monkeypatch.setattr(D, "PACKAGED_DIR", tmp_path)
    with pytest.raises(D.WeightsUnavailableError, match="damaged"):
        D.fetch(wf)
    monkeypatch.setattr(D, "PACKAGED_DIR", tmp_path / "absent")
    with pytest.raises(D.WeightsUnavailableError, match="missing"):
        D.fetch(wf)


def test_create_imagenet_uses_keras_cache(dirs, mobilenet_weights):
    """A file that is not packaged is found in the Keras cache (no hash published: accepted as
    is). Here the 0.25 / 128 file, stood in for by the 224 one: same shapes."""
    keras_models, _ = dirs
    keras_models.mkdir(parents=True)
    (keras_models / "mobilenet_2_5_128_tf_no_top.h5").symlink_to(mobilenet_weights)
    with pytest.warns(D.UnverifiedWeightsWarning, match="mobilenet_2_5_128_tf_no_top.h5: no "
                      "pinned hash.*sha256 " + D.file_digest(mobilenet_weights, "sha256")):
        m = B.create("mobilenet", weights="imagenet", input_size=128)
    assert m.input_size == 128
    leaves = jax.tree.leaves(nnx.state(m, nnx.Param))
    shared = jax.tree.leaves(nnx.state(B.create("mobilenet", weights=mobilenet_weights), nnx.Param))
    assert all(np.array_equal(x, y) for x, y in zip(leaves, shared))
