"""Labels: what people look at and decide with. The end of the flow, beside the study.

    label_ui.py       the matplotlib labelling and review windows (`stackcls label | review`)
    label_session.py  the labels table, CSV merging under a lock, the review queue
    figures.py        prediction, calibration and training figures
    explain.py        Grad-CAM and t-SNE

May import every wing below it (io, preprocess, models, decode, predict); nothing but the CLI and
the study imports it.
"""
