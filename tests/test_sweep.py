"""The CV sweep of one setting: jobs, out-of-fold outputs, the final model, and resuming an
interrupted run (depth 0 on a tiny random-weight MobileNet)."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from stackcls.models import backbones  # noqa: E402
from stackcls.train.checkpoint import is_saved  # noqa: E402
from stackcls.train.engine import Pool  # noqa: E402
from stackcls.models.apply import extract  # noqa: E402
from stackcls.models.classifier import build_classifier  # noqa: E402
from stackcls.preprocess.arrays import patient_folds  # noqa: E402
from stackcls.train.sweep import SimulatedInterrupt, final_job, fold_jobs, run_setting  # noqa: E402

ARGS = dict(lrs=[1e-1, 1e-2], epochs=3, folds=3, seed=0, oversample_factor=2, vmapped=False,
            save_config=dict(backbone="mobilenet", input_size=32))


@pytest.fixture(scope="module")
def setting():
    rng = np.random.default_rng(0)
    y = (np.arange(45) % 3).astype(np.int32)
    x = (rng.random((45, 32, 32, 3)) * 60 + 60 * y[:, None, None, None]).astype(np.float32)
    model = build_classifier(backbones.create("mobilenet", weights=None, input_size=32), 32, seed=0)
    pool = Pool("features", extract(model, x, "features", views=2), extract(model, x, "features"), y)
    return model, pool, np.arange(45) // 3


def test_fold_jobs_cover_every_lr_and_fold():
    y = np.array([0, 1, 1, 2, 1, 1] * 3)
    folds = patient_folds(np.arange(18) // 2, k=3, seed=0)
    jobs = fold_jobs("d0", [0.1, 0.01], folds, y, 6, seed=0)
    assert [j.name for j in jobs[:4]] == ["d0/lr0.1/fold0", "d0/lr0.1/fold1", "d0/lr0.1/fold2", "d0/lr0.01/fold0"]
    for j, (tr, va) in zip(jobs, folds * 2):
        assert set(j.items) == set(tr) and np.array_equal(j.val, va)
        assert len(j.items) == len(tr) + 5 * np.isin(y[tr], (0, 2)).sum()   # OAP/OBS 6x
    fj = final_job("d0", 0.1, y, 6, seed=0)
    assert fj.name == "d0/final" and len(fj.val) == 0 and len(fj.items) == 18 + 5 * 6


def test_vmapped_groups_match_one_job_at_a_time(setting, tmp_path):
    model, pool, subjects = setting
    a = run_setting("d0", model, pool, subjects, out_dir=tmp_path / "a", **ARGS)
    b = run_setting("d0", model, pool, subjects, out_dir=tmp_path / "b", **{**ARGS, "vmapped": True})
    for lr in ARGS["lrs"]:
        for k, v in a["curves"][lr].items():
            np.testing.assert_allclose(b["curves"][lr][k], v, rtol=1e-4, atol=1e-6)
    assert a["selected"] == b["selected"]


def test_interrupted_run_resumes_to_the_same_result(setting, tmp_path):
    model, pool, subjects = setting
    whole = run_setting("d0", model, pool, subjects, out_dir=tmp_path / "a", **ARGS)
    sel = whole["selected"]
    assert sel["learning_rate"] in ARGS["lrs"] and 1 <= sel["epochs"] <= ARGS["epochs"]
    assert whole["curves"][0.1]["val_acc"].shape == (3, 3)
    assert is_saved(tmp_path / "a" / "final")
    assert not np.isnan(whole["oof_probs"]).any() and whole["oof_pen"].shape == (45, 256)
    np.testing.assert_allclose(whole["oof_probs"].sum(1), 1, atol=1e-5)
    assert len(list((tmp_path / "a" / "cv").glob("*.npz"))) == 6 and \
        not list((tmp_path / "a" / "cv").glob("*.tmp"))

    with pytest.raises(SimulatedInterrupt):
        run_setting("d0", model, pool, subjects, out_dir=tmp_path / "b", fail_after_jobs=4, **ARGS)
    first = sorted((tmp_path / "b" / "cv").glob("*.npz"))
    assert len(first) == 4 and not (tmp_path / "b" / "final").exists()
    stamps = [f.stat().st_mtime_ns for f in first]
    resumed = run_setting("d0", model, pool, subjects, out_dir=tmp_path / "b", **ARGS)
    assert [f.stat().st_mtime_ns for f in first] == stamps                  # loaded, not retrained
    assert resumed["selected"] == sel
    for lr in ARGS["lrs"]:
        for k, v in whole["curves"][lr].items():
            np.testing.assert_array_equal(resumed["curves"][lr][k], v)
    np.testing.assert_array_equal(resumed["oof_probs"], whole["oof_probs"])

    again = run_setting("d0", model, pool, subjects, out_dir=tmp_path / "b", **ARGS)   # all done
    assert again["timing"] == resumed["timing"]
    a = jax.tree.leaves(jax.tree.map(np.asarray, again["model"].head))
    b = jax.tree.leaves(jax.tree.map(np.asarray, resumed["model"].head))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
