"""Reading Keras weight files with h5py and strict loading into a port."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py
import numpy as np
import pytest

from stackcls.models import backbones as B
from stackcls.models.backbones import layers as L
from stackcls.models.backbones.weights import WeightsError, load_keras_weights, read_keras_weights

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


_TO_KERAS1 = {"kernel": "W", "bias": "b", "moving_mean": "running_mean",
              "moving_variance": "running_std"}


def _wname(layer, w, style):
    if style == "keras1":  # e.g. VGG16's real file: block1_conv1_W_1:0, flat in the layer group
        return f"{layer}_{_TO_KERAS1.get(w, w)}_1:0"
    return f"{layer}/{w}:0" if style == "keras2" else f"{layer}/{w}"


def write_legacy(path, file_layers, style="keras2"):
    """The legacy weights-only layout, written by hand (independent of Keras's writer)."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([l.name.encode() for l in file_layers])
        f.attrs["keras_version"] = b"1.2.2" if style == "keras1" else b"2.0.4"
        for l in file_layers:
            g = f.create_group(l.name)
            names = [_wname(l.name, w, style) for w, _ in l.weights]
            g.attrs["weight_names"] = np.array([n.encode() for n in names])
            for n, (_, a) in zip(names, l.weights):
                g.create_dataset(n, data=a)
    return path


def _values(model):
    return {n: [np.asarray(v[...]) for v in l.keras_weights()]
            for n, l in L.keras_layers(model).items()}


def _assert_same(model, keras_model):
    ours = _values(model)
    for kl in keras_model.layers:
        if kl.weights:
            for a, b in zip(ours[kl.name], kl.weights):
                np.testing.assert_array_equal(a, np.asarray(b))


@pytest.fixture(scope="module")
def keras():
    """Keras is an optional test extra: only the tests that write files with it skip without it."""
    return pytest.importorskip("keras")


@pytest.fixture(scope="module")
def keras_mobilenet(keras):
    km = keras.applications.MobileNet(alpha=0.25, include_top=False, weights=None,
                                      input_shape=(64, 64, 3))
    rng = np.random.default_rng(0)
    for v in km.weights:
        v.assign(rng.normal(0, 1, v.shape).astype("float32") ** 2)  # all != init, var > 0
    return km


def test_keras3_layouts_load(keras, keras_mobilenet, tmp_path):
    km = keras_mobilenet
    legacy = tmp_path / "legacy.h5"
    with h5py.File(legacy, "w") as f:
        keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group(f, km)
    full = tmp_path / "full.h5"
    km.save(full)
    wh5 = tmp_path / "m.weights.h5"
    km.save_weights(wh5)
    for path in (legacy, full, wh5):
        m = B.create("mobilenet", weights=path, input_size=64)
        _assert_same(m, km)


def test_weights_h5_matches_by_class_when_names_differ(keras_mobilenet, tmp_path):
    """.weights.h5 of a model whose layers have other names: matched per class, in order."""
    wh5 = tmp_path / "m.weights.h5"
    keras_mobilenet.save_weights(wh5)
    with h5py.File(wh5, "r+") as f:
        for key, g in f["layers"].items():
            if "vars" in g and len(g["vars"]):
                g["vars"].attrs["name"] = key  # auto-names such as batch_normalization_3
    m = B.create("mobilenet", weights=wh5, input_size=64)
    _assert_same(m, keras_mobilenet)


def test_real_file_contents(mobilenet_weights):
    layers = read_keras_weights(mobilenet_weights)
    arrays = [a for l in layers for _, a in l.weights]
    assert len(arrays) == 135
    assert sum(a.size for a in arrays) == 218_544
    assert layers[0].name == "conv1" and layers[0].weights[0][0] == "kernel"
    bn = layers[1]
    assert [w for w, _ in bn.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert layers[2].weights[0][0] == "depthwise_kernel"  # Keras 2 name
    m = B.create("mobilenet", weights=mobilenet_weights)
    vals = _values(m)
    for l in layers:
        for (_, a), b in zip(l.weights, vals[l.name]):
            np.testing.assert_array_equal(a, b)


@pytest.fixture()
def real_layers(mobilenet_weights):
    return read_keras_weights(mobilenet_weights)


def _load_error(tmp_path, layers, match):
    p = write_legacy(tmp_path / "bad.h5", layers)
    m = B.create("mobilenet", weights=None)
    before = _values(m)
    with pytest.raises(WeightsError, match=match):
        load_keras_weights(m, p)
    after = _values(m)  # nothing assigned on failure
    assert all(np.array_equal(a, b) for k in before for a, b in zip(before[k], after[k]))


def test_order_matching_with_auto_names(real_layers, tmp_path):
    """Session-dependent names (conv2d_7, ...) are matched by position, like Keras's load_weights."""
    kinds = {"kernel": "conv2d", "depthwise_kernel": "depthwise_conv2d", "gamma": "batch_normalization"}
    renamed = [type(l)(f"{kinds[l.weights[0][0]]}_{i + 40}", l.weights) for i, l in enumerate(real_layers)]
    p = write_legacy(tmp_path / "auto.h5", renamed, style="keras3")
    m = B.create("mobilenet", weights=p)
    assert np.array_equal(np.asarray(m.conv1.kernel[...]), real_layers[0].weights[0][1])


def test_keras1_weight_names(real_layers, tmp_path):
    p = write_legacy(tmp_path / "k1.h5", real_layers, style="keras1")
    with h5py.File(p) as f:
        assert "conv1_bn_running_std_1:0" in f["conv1_bn"]
    m = B.create("mobilenet", weights=p)
    vals = _values(m)
    for l in real_layers:
        for (_, a), b in zip(l.weights, vals[l.name]):
            np.testing.assert_array_equal(a, b)


def test_missing_weight_is_an_error(real_layers, tmp_path):
    real_layers[1].weights = real_layers[1].weights[:3]
    _load_error(tmp_path, real_layers, r"conv1_bn.*3 weights")


def test_wrong_shape_is_an_error(real_layers, tmp_path):
    n, a = real_layers[4].weights[0]
    real_layers[4].weights[0] = (n, a[:, :, :4])
    _load_error(tmp_path, real_layers, r"conv_pw_1.*kernel.*shape \(1, 1, 4, 16\)")


def test_extra_layer_is_an_error(real_layers, tmp_path):
    real_layers.append(type(real_layers[0])("dense_extra", [("kernel", np.zeros((256, 3), "f4"))]))
    _load_error(tmp_path, real_layers, r"55 layers with weights in the file, 54 in the model.*dense_extra")


def test_swapped_layers_are_an_error(real_layers, tmp_path):
    """Stable names that disagree with the position are refused, even with equal shapes."""
    real_layers[1].name, real_layers[3].name = "x_bn", "y_bn"
    _load_error(tmp_path, real_layers, r"names differ")


def test_wrong_weight_name_is_an_error(real_layers, tmp_path):
    real_layers[1].weights[0] = ("scale", real_layers[1].weights[0][1])
    _load_error(tmp_path, real_layers, r"weight 'scale' where the model expects 'gamma'")


def test_nan_is_an_error(real_layers, tmp_path):
    a = real_layers[0].weights[0][1].copy()
    a[0, 0, 0, 0] = np.nan
    real_layers[0].weights[0] = ("kernel", a)
    _load_error(tmp_path, real_layers, r"NaN")


def test_undeclared_dataset_is_an_error(real_layers, tmp_path):
    p = write_legacy(tmp_path / "extra.h5", real_layers)
    with h5py.File(p, "r+") as f:
        f["conv1"].create_dataset("conv1/stray:0", data=np.zeros(3))
    with pytest.raises(WeightsError, match="conv1.*stray"):
        read_keras_weights(p)


def test_not_hdf5_and_missing(tmp_path):
    p = tmp_path / "x.h5"
    p.write_bytes(b"not hdf5")
    with pytest.raises(WeightsError, match="not a readable HDF5"):
        read_keras_weights(p)
    with pytest.raises(FileNotFoundError):
        read_keras_weights(tmp_path / "nope.h5")
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(WeightsError, match="not a Keras weight file"):
        read_keras_weights(tmp_path / "empty.h5")


# Hostile files (issue 13, item 4): only float datasets stored in the file itself are read.

def _reads(monkeypatch):
    """Names of the datasets whose data h5py reads from now on."""
    seen, orig = [], h5py.Dataset.__getitem__

    def getitem(self, *a, **k):
        seen.append(self.name)
        return orig(self, *a, **k)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)
    return seen


def test_external_storage_is_refused_unread(real_layers, tmp_path, monkeypatch):
    """A dataset whose raw data lives in another local file (HDF5 external storage) would make
    the loader read that file: refused, and no data of it is read."""
    kernel = real_layers[0].weights[0][1]
    secret = tmp_path / "secret.bin"
    secret.write_bytes(kernel.astype("<f4").tobytes())  # a loadable payload: fails without the fix
    p = write_legacy(tmp_path / "ext.h5", real_layers)
    with h5py.File(p, "r+") as f:
        g = f["conv1"]
        del g["conv1/kernel:0"]
        g.create_dataset("conv1/kernel:0", shape=kernel.shape, dtype="<f4",
                         external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
    reads = _reads(monkeypatch)
    m = B.create("mobilenet", weights=None)
    with pytest.raises(WeightsError, match=r"ext\.h5: layer 'conv1' weight 'conv1/kernel:0' "
                                           r"\(dataset /conv1/conv1/kernel:0\) has external storage"):
        load_keras_weights(m, p)
    assert "/conv1/conv1/kernel:0" not in reads


def test_virtual_dataset_and_external_link_are_refused(real_layers, tmp_path):
    kernel = real_layers[0].weights[0][1]
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["k"] = kernel
    p = write_legacy(tmp_path / "vds.h5", real_layers)
    with h5py.File(p, "r+") as f:
        del f["conv1"]["conv1/kernel:0"]
        layout = h5py.VirtualLayout(shape=kernel.shape, dtype=kernel.dtype)
        layout[...] = h5py.VirtualSource(str(other), "k", shape=kernel.shape)
        f["conv1"].create_virtual_dataset("conv1/kernel:0", layout)
    with pytest.raises(WeightsError, match=r"vds\.h5: .*conv1/kernel:0.* virtual dataset"):
        read_keras_weights(p)
    p = write_legacy(tmp_path / "link.h5", real_layers)
    with h5py.File(p, "r+") as f:
        del f["conv1"]["conv1/kernel:0"]
        f["conv1"]["conv1"]["kernel:0"] = h5py.ExternalLink(str(other), "k")
    with pytest.raises(WeightsError, match=r"link\.h5: .*conv1/kernel:0.* external link"):
        read_keras_weights(p)


@pytest.mark.parametrize("dtype", ["int32", "complex64", "bool"])
def test_non_float_weights_are_refused(real_layers, tmp_path, dtype):
    """Integer/complex/bool arrays would be cast silently (complex: imaginary part dropped)."""
    real_layers[0].weights[0] = ("kernel", real_layers[0].weights[0][1].astype(dtype))
    _load_error(tmp_path, real_layers,
                rf"bad\.h5: layer 'conv1' .*dataset /conv1/conv1/kernel:0\) has dtype {dtype}")


def test_absurd_declared_shape_is_refused(real_layers, tmp_path):
    p = write_legacy(tmp_path / "huge.h5", real_layers)
    with h5py.File(p, "r+") as f:
        del f["conv1"]["conv1/kernel:0"]
        f["conv1"].create_dataset("conv1/kernel:0", shape=(1 << 15, 1 << 15), dtype="f4",
                                  chunks=(64, 64))  # nothing written: a few KB on disk
    with pytest.raises(WeightsError, match=r"huge\.h5: .*declares shape \(32768, 32768\)"):
        read_keras_weights(p)
