"""The one-study path from the shell: the persistent compilation cache (`stackcls.cache.compile_cache`),
argument errors without JAX, and how many programs a sweep of stack lengths compiles.

The cache is process-wide JAX state that is decided once, so every cache test runs its own
subprocess with its own STACKCLS_CACHE; a tiny traceable model keeps each under a few seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

PY = sys.executable

# a tiny model (no stack head: mode slice_ordered), a 12-slice array, the prediction as JSON and
# the cache hits JAX counted
SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
hits = []
jax.monitoring.register_event_listener(
    lambda e, **kw: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
from stackcls.predict.stack import predict_stack

class Tiny:
    stack_head = None
    def preprocess(self, images):
        return np.asarray(images, np.float32)[..., None]
    def slice_outputs(self, x):
        m = jnp.mean(x, axis=(1, 2, 3))
        pen = jnp.stack([m, jnp.sin(3 * m)], 1)
        return pen, jax.nn.softmax(-(m[:, None] - jnp.arange(3.0)) ** 2, axis=1)

rng = np.random.default_rng(0)
y = np.array([0] * 3 + [1] * 6 + [2] * 3)
img = (y[:, None, None] + 0.3 * rng.normal(size=(12, 8, 8))).astype(np.float32)
p = predict_stack(img, Tiny(), mode="slice_ordered", orientation="unknown")
print(json.dumps(dict(pred=p.to_dict(), hits=len(hits))))
"""


def run_tiny(tmp_path, cache, **env):
    e = {k: v for k, v in os.environ.items()
         if k not in ("STACKCLS_NO_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    e.update(STACKCLS_CACHE=str(cache), JAX_PLATFORMS="cpu", **env)
    r = subprocess.run([PY, "-c", SCRIPT], env=e, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_cache_filled_reused_and_outputs_identical(tmp_path):
    cache = tmp_path / "cache"
    cold, _ = run_tiny(tmp_path, cache)
    entries = list((cache / "jax").iterdir())
    assert entries, "no compilation cache entries written"
    warm, _ = run_tiny(tmp_path, cache)
    assert warm["hits"] > 0 and cold["hits"] == 0, (cold["hits"], warm["hits"])
    off, _ = run_tiny(tmp_path, tmp_path / "other", STACKCLS_NO_COMPILE_CACHE="1")
    assert not (tmp_path / "other" / "jax").exists() and off["hits"] == 0
    # the JSON a user gets, byte for byte
    assert json.dumps(cold["pred"]) == json.dumps(warm["pred"]) == json.dumps(off["pred"])


def test_unusable_cache_dir_warns_once_and_works(tmp_path):
    blocker = tmp_path / "a_file"        # a file where the folder should be: mkdir fails, even as root
    blocker.write_text("x")
    out, err = run_tiny(tmp_path, blocker)
    assert out["pred"]["labels"] and out["hits"] == 0
    assert err.count("compilation cache off") == 1, err
    assert "Error writing persistent compilation cache" not in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_cache_dir_warns_and_works(tmp_path):
    ro = tmp_path / "ro"
    (ro / "jax").mkdir(parents=True)
    (ro / "jax").chmod(0o555)
    try:
        out, err = run_tiny(tmp_path, ro)
    finally:
        (ro / "jax").chmod(0o755)
    assert out["pred"]["labels"] and err.count("compilation cache off") == 1, err


def test_compile_cache_off_by_env_and_decided_once(monkeypatch, tmp_path):
    from stackcls import cache
    monkeypatch.setattr(cache, "_compile_cache", {})
    monkeypatch.setenv("STACKCLS_NO_COMPILE_CACHE", "1")
    monkeypatch.setenv("STACKCLS_CACHE", str(tmp_path))
    assert cache.compile_cache() is None
    monkeypatch.delenv("STACKCLS_NO_COMPILE_CACHE")
    assert cache.compile_cache() is None          # decided once per process
    assert not (tmp_path / "jax").exists()


LIGHT = r"""
import sys
from stackcls.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
heavy = sorted(m for m in ("jax", "flax", "pydicom", "nibabel") if m in sys.modules)
print("RC", rc, "HEAVY", ",".join(heavy) or "-")
"""


@pytest.mark.parametrize("argv, rc", [
    (["--help"], 0),
    (["predict", "--help"], 0),
    (["predict"], 2),                                   # argparse usage error
    (["predict", "/no/such/study"], 2),
    (["predict", ".", "--model", "/no/such/model"], 2),
    (["predict", ".", "--review-below", "7"], 2),
])
def test_help_and_argument_errors_do_not_import_jax(tmp_path, argv, rc):
    e = dict(os.environ, STACKCLS_CACHE=str(tmp_path))
    r = subprocess.run([PY, "-c", LIGHT, *argv], env=e, capture_output=True, text=True, timeout=60)
    last = r.stdout.strip().splitlines()[-1]
    assert last == f"RC {rc} HEAVY -", (last, r.stderr[-2000:])
    if rc == 2 and argv[1:2] != []:
        assert "error:" in r.stderr


def test_compilations_per_bucket_over_lengths_6_to_24():
    """Stacks of 6..24 slices in one process: the core is traced (= compiled) once per padded
    length (`predict.stack.padded_length`: 8, 12, 16, 20, 24), never once per stack length."""
    import jax.numpy as jnp
    from stackcls.predict.stack import padded_length, predict_stack

    class Counting:
        stack_head = None

        def __init__(self):
            self.traces = 0

        def preprocess(self, images):
            return np.asarray(images, np.float32)[..., None]

        def slice_outputs(self, x):
            self.traces += 1                              # one Python run per trace
            m = jnp.mean(x, axis=(1, 2, 3))
            return jnp.stack([m, m], 1), jnp.stack([m, m, m], 1) * 0 + 1 / 3

    model = Counting()
    rng = np.random.default_rng(0)
    for S in range(6, 25):
        predict_stack(rng.normal(size=(S, 4, 4)).astype(np.float32), model,
                      mode="slice_ordered", orientation="apex_to_base")
    buckets = {padded_length(S) for S in range(6, 25)}
    assert len(buckets) == 5 and model.traces <= len(buckets)


# ----------------------------------------------------------------------------- traced programs on disk

PROGRAM = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from stackcls.programs import Program

def fn(state, x):          # a pytree of weights (dict, list), two outputs
    h = jnp.tanh(x @ state["w"][0] + state["b"])
    return h.sum(1), jnp.argmax(h, 1)

rng = np.random.default_rng(0)
state = {"w": [jax.device_put(rng.normal(size=(5, 4)).astype(np.float32))],
         "b": jax.device_put(np.arange(4, dtype=np.float32))}
x = rng.normal(size=(3, 5)).astype(np.float32)
p = Program(fn, "tiny", key=sys.argv[1])
a, b = p(state, x)
p(state, x)                                 # the same signature: no second load or trace
c, d = jax.jit(fn)(state, x)
print(json.dumps(dict(loaded=p.loaded, out=np.asarray(a).tolist(), arg=np.asarray(b).tolist(),
                      same=bool(np.array_equal(a, c) and np.array_equal(b, d)))))
"""


def run_program(cache, key="k1", **env):
    e = {k: v for k, v in os.environ.items()
         if k not in ("STACKCLS_NO_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    e.update(STACKCLS_CACHE=str(cache), JAX_PLATFORMS="cpu", **env)
    r = subprocess.run([PY, "-c", PROGRAM, key], env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_program_kept_on_disk_reused_and_identical_to_jit(tmp_path):
    cache = tmp_path / "c"
    first = run_program(cache)
    files = sorted((cache / "programs").glob("tiny-*.bin"))
    assert first["loaded"] == 0 and len(files) == 1 and first["same"]
    second = run_program(cache)
    assert second["loaded"] == 1 and second["same"]
    assert (second["out"], second["arg"]) == (first["out"], first["arg"])
    # another key (another architecture or config) never reads that entry
    other = run_program(cache, key="k2")
    assert other["loaded"] == 0 and len(list((cache / "programs").glob("tiny-*.bin"))) == 2
    # a damaged entry costs a trace, not an error, and is written again
    files[0].write_bytes(b"not a program")
    again = run_program(cache)
    assert again["loaded"] == 0 and again["out"] == first["out"] and files[0].stat().st_size > 100
    # off with the compilation cache: nothing written
    off = run_program(tmp_path / "off", STACKCLS_NO_COMPILE_CACHE="1")
    assert off["loaded"] == 0 and off["out"] == first["out"]
    assert not (tmp_path / "off" / "programs").exists()


def test_program_key_covers_the_source():
    """An edit anywhere in the package changes every entry's name (no stale program is run)."""
    from stackcls import programs
    d = programs.source_digest()
    assert len(d) == 64 and d == programs.source_digest()


def test_shipped_model_same_json_with_programs_on_disk_and_without(tmp_path):
    """The shipped model through `stackcls predict`: a cold cache, a warm one (programs read from
    disk) and the cache off give the same JSON, byte for byte, and the warm run read its programs."""
    from stackcls.phantom import cohort
    study = cohort(2, seed=0) / "dicom"
    outs = []
    for name, cache, env in (("cold", "c", {}), ("warm", "c", {}),
                             ("off", "o", {"STACKCLS_NO_COMPILE_CACHE": "1"})):
        e = {k: v for k, v in os.environ.items()
             if k not in ("STACKCLS_NO_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
        e.update(STACKCLS_CACHE=str(tmp_path / cache), JAX_PLATFORMS="cpu", **env)
        out = tmp_path / f"{name}.json"
        r = subprocess.run([PY, "-m", "stackcls.cli", "predict", str(study), "--json", str(out)],
                           env=e, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(out.read_bytes())
        kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c" / "programs").glob("*.bin")}
        if name == "cold":
            written = kept
            assert sorted(n.rsplit("-", 1)[0] for n in kept) == ["anatomy-ensemble", "anatomy-net"]
        else:     # read, not traced and written again
            assert kept == written
    assert outs[0] == outs[1] == outs[2]
    assert not (tmp_path / "o" / "programs").exists()


# a model file loaded, its ensemble run on fixed inputs, then its modules asked for
LAZY = r"""
import hashlib, json, sys
import numpy as np
from stackcls.io.errors import ModelFileError
from stackcls.models.anatomy import FoldWeights
from stackcls.predict import model_file
try:
    m = model_file.load(sys.argv[1])
except ModelFileError as e:
    print(json.dumps(dict(error=str(e))))
    sys.exit(0)
built = "ensemble" in m.__dict__
x = np.random.default_rng(0).uniform(0, 255, (4, 128, 128, 3)).astype(np.float32)
o = m.run(x)
digest = hashlib.sha256(b"".join(np.ascontiguousarray(o[k]).tobytes() for k in sorted(o))).hexdigest()
w = FoldWeights.of(m.ensemble)                    # the modules: built now if they were not
same = w.names == m.weights.names and all(np.array_equal(a, b) for a, b in zip(w.stacked, m.weights.stacked))
print(json.dumps(dict(built=built, digest=digest, same=same, nets=len(m.ensemble.nets))))
"""


def run_lazy(cache, model, **env):
    e = {k: v for k, v in os.environ.items()
         if k not in ("STACKCLS_NO_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    e.update(STACKCLS_CACHE=str(cache), JAX_PLATFORMS="cpu", **env)
    r = subprocess.run([PY, "-c", LAZY, str(model)], env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def write_model(path, meta, arrays):
    """A model file of these arrays, its part hashes made to match (only the architecture check
    can then tell an edit)."""
    from stackcls.predict import model_file
    meta = dict(meta, parts={n: dict(p, sha256=model_file._arrays_hash(arrays, n + "/"))
                             for n, p in (meta.get("parts") or {}).items()})
    np.savez(path, **arrays, **{model_file.MANIFEST: np.frombuffer(json.dumps(meta).encode(), np.uint8)})
    return path


def test_warm_model_file_runs_without_building_its_modules(tmp_path):
    """Once a model file's variables were checked against the modules (this cache, this source),
    a new process reads them straight into the traced programs: no module is built, the outputs
    are the same bytes as with the modules built (cold) and with the cache off, and the modules,
    when asked for, hold the file's values. An edited file is checked again; its error names it."""
    from stackcls import pretrained
    from stackcls.predict import model_file
    f = pretrained.DEFAULT_DIR / model_file.WEIGHTS
    cold, warm = run_lazy(tmp_path / "c", f), run_lazy(tmp_path / "c", f)
    off = run_lazy(tmp_path / "o", f, STACKCLS_NO_COMPILE_CACHE="1")
    assert cold["built"] and off["built"] and not warm["built"]
    assert cold["digest"] == warm["digest"] == off["digest"]
    assert cold["same"] and warm["same"] and warm["nets"] == 5
    meta, arrays = model_file.read(f)
    some = sorted(k for k in arrays if k.startswith("ensemble/nets/0/"))[0].split("/", 3)[3]
    edits = {
        "renamed": ({k.replace(some, some + "_x"): v for k, v in arrays.items()}, "is missing"),
        "shape": ({k: v[..., :-1] if k.endswith(some) else v for k, v in arrays.items()}, "has shape"),
        "one fold": ({k: v for k, v in arrays.items() if k != f"ensemble/nets/3/{some}"},
                     "fold network 3 does not have fold 0's variables"),
    }
    for name, (edited, why) in edits.items():
        g = write_model(tmp_path / f"{name.replace(' ', '_')}.npz", meta, edited)
        r = run_lazy(tmp_path / "c", g)
        assert r.get("error", "").startswith(str(g)) and why in r["error"], (name, r)
