"""Where ImageNet weight files come from: the registry's declarations, the file shipped in the
package, the caches, and the download (against a loopback HTTP server; no internet needed)."""

from __future__ import annotations

import hashlib
import http.server
import inspect
import threading
import urllib.request

import jax
import numpy as np
import pytest
from flax import nnx

from stackcls import backbones as B
from stackcls.backbones import download as D
from stackcls.backbones.layers import keras_layers

# Deterministic bytes: pytest-xdist workers must collect the same parametrised ids.
BODY = np.random.default_rng(0).bytes(300_000)
MD5 = hashlib.md5(BODY).hexdigest()
SHA = hashlib.sha256(BODY).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):
        Handler.hits.append(self.path)
        if self.path == "/good.h5":
            body, length = BODY, len(BODY)
        elif self.path == "/truncated.h5":
            body, length = BODY[:100_000], len(BODY)  # promises more than it sends
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
    return tmp_path / "keras" / "models", tmp_path / "cache" / "weights"


@pytest.mark.parametrize("file_hash", [MD5, SHA, None])
def test_good_download_then_cached(server, dirs, file_hash):
    _, cache = dirs
    wf = D.WeightFile("w.h5", server + "/good.h5", file_hash)
    Handler.hits.clear()
    p = D.fetch(wf, progress=False)
    assert p == cache / "w.h5" and p.read_bytes() == BODY
    assert D.fetch(wf, progress=False) == p
    assert Handler.hits == ["/good.h5"]  # second call served from the cache
    assert sorted(x.name for x in cache.iterdir()) == ["w.h5"]  # no temp files left


def test_keras_cache_comes_first(server, dirs):
    keras_models, cache = dirs
    keras_models.mkdir(parents=True)
    (keras_models / "w.h5").write_bytes(BODY)
    Handler.hits.clear()
    assert D.fetch(D.WeightFile("w.h5", server + "/good.h5", MD5)) == keras_models / "w.h5"
    assert Handler.hits == []


@pytest.mark.parametrize("path,match", [("/truncated.h5", "truncated"),
                                        ("/corrupt.h5", "does not match the published md5"),
                                        ("/missing.h5", "HTTP 404")])
def test_bad_downloads_leave_nothing(server, dirs, path, match):
    _, cache = dirs
    with pytest.raises(D.WeightsUnavailableError, match=match):
        D.fetch(D.WeightFile("w.h5", server + path, MD5), progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_corrupt_cached_file_is_refused(dirs):
    _, cache = dirs
    cache.mkdir(parents=True)
    (cache / "w.h5").write_bytes(BODY[:-1])
    with pytest.raises(D.WeightsUnavailableError, match=r"w\.h5 does not match.*delete it"):
        D.fetch(D.WeightFile("w.h5", "http://127.0.0.1:9/w.h5", SHA))


def test_offline_error_says_where_to_put_the_file(dirs, monkeypatch):
    keras_models, cache = dirs
    wf = B.spec("vgg16").weight_file()
    # nothing listens on port 9 of the loopback interface: connection refused
    wf = D.WeightFile(wf.fname, "http://127.0.0.1:9/" + wf.fname, wf.file_hash)
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
    m = B.create("mobilenet", weights="imagenet", input_size=128)
    assert m.input_size == 128
    leaves = jax.tree.leaves(nnx.state(m, nnx.Param))
    shared = jax.tree.leaves(nnx.state(B.create("mobilenet", weights=mobilenet_weights), nnx.Param))
    assert all(np.array_equal(x, y) for x, y in zip(leaves, shared))
