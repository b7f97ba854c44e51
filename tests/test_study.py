"""The study's configuration, settings plan, Grad-CAM cell choice and report tables (no training)."""

import dataclasses

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import MissingMandatoryValue

from stackcls.ui.explain import gradcam_cells
from stackcls.models.stack_head import StackHeadConfig
from stackcls.study.config import PAPER, QUICK, as_plain, compose, identity
from stackcls.study.report import MODE_ROWS, metric_rows, results_markdown, summary_table
from stackcls.study.settings import Depth0, Depth1, Scratch, plan, vmapped

# the values of the YAML presets this configuration replaced (experiments/conf/protocol/*.yaml)
PAPER_YAML = dict(name="paper", synthetic_subjects=dict(train=100, test=100), image_size=None, views=8,
                  epochs=50, folds=5, batch_size=32, decay=1e-6, oversample=6, rotation=45.0,
                  learning_rates=dict(depth0=[1e-2, 1e-3, 1e-4], depth1=[1e-3, 1e-4, 1e-5],
                                      scratch=[1e-2, 1e-3, 1e-4]),
                  stack=dict(enabled=True, inputs="oof", epochs=300, learning_rates=[3e-3, 1e-3]))
QUICK_YAML = dict(name="quick", synthetic_subjects=dict(train=10, test=6),
                  image_size=dict(default=96, vgg16=64), views=2, epochs=4, folds=5, batch_size=32,
                  decay=1e-6, oversample=6, rotation=45.0,
                  learning_rates=dict(depth0=[1e-2, 1e-3], depth1=[1e-3], scratch=[1e-2]),
                  stack=dict(enabled=True, inputs="oof", epochs=60, learning_rates=[3e-3]))


@pytest.mark.parametrize("preset, yaml", [(PAPER, PAPER_YAML), (QUICK, QUICK_YAML)])
def test_protocol_presets_keep_their_values(preset, yaml):
    plain = as_plain(preset)
    stack = plain.pop("stack")
    plain.pop("anatomy")   # method=anatomy's settings, added after the YAML presets
    assert plain.pop("fold_by") == "subject"    # added later too: the YAML's patient folds
    assert plain == {k: v for k, v in yaml.items() if k != "stack"}
    assert {k: stack[k] for k in yaml["stack"]} == yaml["stack"]
    # every other stack-head setting is the stack model's own default
    head = as_plain(StackHeadConfig())
    assert {k: v for k, v in stack.items() if k not in yaml["stack"] and k in head} == \
        {k: v for k, v in head.items() if k not in yaml["stack"]}


def test_defaults_and_command_line_overrides():
    s = compose([])
    assert (s.backbone, s.depth, s.weights, s.seed, s.data.name, s.protocol.name) == \
        ("mobilenet", 1, "imagenet", 0, "synthetic", "quick")
    assert s.run_dir.endswith("mobilenet_synthetic_quick_d1_s0")
    assert compose(["method=anatomy"]).run_dir.endswith("mobilenet_synthetic_quick_anatomy_d1_s0")
    s = compose(["backbone=vgg16", "data=acdc", "data.root=/some/acdc", "protocol=paper", "seed=3",
                 "protocol.stack.epochs=7", "protocol.image_size=32", "vmap=false"])
    assert s.run_dir.endswith("vgg16_acdc_paper_d1_s3")
    assert s.protocol.stack.epochs == 7 and s.protocol.image_size == 32 and s.vmap is False
    assert s.protocol.stack.head() == StackHeadConfig(epochs=7, learning_rates=(3e-3, 1e-3))
    # a folder data set has no cohort seed: its identity is that of the former YAML preset
    assert set(identity(s)["data"]) == {"name", "root", "labels", "keep", "test_size", "max_subjects"}
    assert "stack" not in identity(s)["protocol"]
    assert identity(s) == identity(dataclasses.replace(
        s, protocol=dataclasses.replace(s.protocol, stack=QUICK.stack)))


@pytest.mark.parametrize("overrides", [["protocol.epochs=many"], ["protocol.nonsense=1"],
                                       ["protocol.stack.hidden=x"], ["data=nowhere"]])
def test_overrides_are_type_checked(overrides):
    with pytest.raises(ConfigCompositionException):
        compose(overrides)


def test_invalid_values_are_refused():
    with pytest.raises(MissingMandatoryValue):
        compose(["data=dicom", "data.root=/x"])        # data.labels is required
    with pytest.raises(ValueError, match="inputs"):
        compose(["protocol.stack.inputs=everything"])
    with pytest.raises(ValueError, match="epochs"):
        compose(["protocol.stack.epochs=0"])


def test_plan():
    assert [type(s) for s in plan("mobilenet", 1)] == [Depth0, Depth1]
    assert [type(s) for s in plan("mobilenet", 0)] == [Depth0]
    assert [type(s) for s in plan("cbr_small", 1)] == [Scratch]
    with pytest.raises(ValueError, match="depth"):
        plan("vgg16", 2)
    assert [s.key for s in plan("vgg16", 1)] == ["0", "1"]
    assert vmapped(False, "auto") and vmapped(True, True) and not vmapped(False, False)


def test_gradcam_cells():
    y = np.array([0, 0, 1, 2, 2])
    probs = np.array([[.9, .1, 0], [.6, .4, 0], [.2, .7, .1], [.1, .3, .6], [.1, .1, .8]])
    assert gradcam_cells(y, probs) == {(0, 0): 0, (1, 1): 2, (2, 2): 4}
    assert gradcam_cells(np.array([1]), np.array([[.5, .2, .3]])) == {(1, 0): 0}


def test_report_rows_and_tables():
    m = dict(f1=dict(OAP=.5, IN=.9, OBS=.25), auc_weighted=None, auc_micro=.8, accuracy=.75,
             soft_accuracy=.9, exact_range_rate=.5, boundary_mae=1.0)
    row = dict(selected=dict(learning_rate=0.01, epochs=3),
               test=dict(slice=m, slice_ordered=m, stack=None,
                         stack_orientation_withheld=dict(m, direction_accuracy=0.75)),
               timing=dict(cv_seconds=60.0, final_seconds=30.0))
    results = dict(backbone="mobilenet", data="synthetic", weights="random", protocol="quick",
                   seed=0, depths={"0": row}, timing=dict(total_seconds=120.0))
    rows = metric_rows(results)
    assert [r["mode"] for r in rows] == [m for m in MODE_ROWS if m != "stack"]
    assert rows[0]["f1.OBS"] == .25 and rows[0]["auc_weighted"] is None and rows[0]["minutes"] == 1.5
    md = results_markdown(results)
    assert "| 0 | slice | 0.01 | 3 | 0.500 | 0.900 | 0.250 | - | 0.800 |" in md
    assert "direction found for 0.750" in md
    assert "total 2.00 min" in summary_table(results)
    # the trivial answer is reported beside every run, last
    results["trivial"] = dict(all_in=dict(m, exact_range_rate=.625))
    rows = metric_rows(results)
    assert rows[-1]["mode"] == "every slice IN" and rows[-1]["exact_range_rate"] == .625
    assert "| - | every slice IN | - | - |" in results_markdown(results)


def test_trivial_row_is_every_slice_in():
    from stackcls.study.evaluation import trivial_row
    arrays = dict(y=np.array([0, 1, 1, 1, 1, 2]), stack_index=np.array([0, 0, 0, 1, 1, 1]),
                  slice_index=np.array([0, 1, 2, 0, 1, 2]))
    row = trivial_row(arrays)
    # stack 0 (OAP IN IN) is wrong, stack 1 (IN IN OBS) too: no exact range; 4 of 6 slices right
    assert row["exact_range_rate"] == 0.0 and row["accuracy"] == 4 / 6
    assert row["f1"]["OAP"] == 0.0 and row["f1"]["OBS"] == 0.0
