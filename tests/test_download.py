"""Weight download and cache, against a loopback HTTP server (no internet needed)."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading

import numpy as np

import pytest

from stackcls.backbones import download as D

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
    wf = D.weight_file("vgg16")
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
    assert D.weight_file("vgg16") == D.WeightFile(
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        base + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc")
    assert D.weight_file("mobilenet").fname == "mobilenet_2_5_224_tf_no_top.h5"
    assert D.weight_file("mobilenet", alpha=0.5, input_size=160).url == \
        base + "mobilenet/mobilenet_5_0_160_tf_no_top.h5"
    assert D.weight_file("mobilenet", input_size=100).fname == "mobilenet_2_5_224_tf_no_top.h5"
    assert D.weight_file("mobilenet_v2", input_size=96).fname == \
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"
    assert D.weight_file("nasnet_mobile").fname == "nasnet_mobile_no_top.h5"
    assert D.weight_file("nasnet_mobile").url.endswith("nasnet/NASNet-mobile-no-top.h5")
    for n in ("inception_v3", "resnet50_v2", "inception_resnet_v2", "densenet121", "xception"):
        wf = D.weight_file(n)
        assert wf.url.startswith(base) and wf.url.endswith(wf.fname) and len(wf.file_hash) == 32
    with pytest.raises(ValueError, match="alpha"):
        D.weight_file("mobilenet", alpha=0.3)


def test_create_imagenet_uses_keras_cache(dirs, mobilenet_weights):
    """create(weights="imagenet") finds the real file in the Keras cache and checks its sha256."""
    from stackcls import backbones as B
    keras_models, _ = dirs
    keras_models.mkdir(parents=True)
    (keras_models / "mobilenet_2_5_224_tf_no_top.h5").symlink_to(mobilenet_weights)
    m = B.create("mobilenet", weights="imagenet", input_size=100)  # no 100 file: 224, as Keras
    assert m.input_size == 100
