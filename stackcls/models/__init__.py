"""Networks: arrays -> per-slice scores, and the heads that read a whole stack.

    backbones/     the nine Keras ImageNet backbones and the CBR baselines, with their weights
    classifier.py  the paper's classifier: a backbone plus its head (Dense 256, dropout, Dense 3)
    apply.py       frozen-backbone passes over a dataset (features, trunk outputs, logits)
    anatomy.py     method=anatomy's network: the backbone as the encoder of a light U-Net, and
                   the ensemble of fold networks
    evidence.py    the per-slice anatomy read off its masks (areas, ring closure, the basal rule)
    stack_head.py  the stack head: a bidirectional GRU over the slices of a stack
    direction.py   which end is the apex, from the slices' features (antisymmetric)

Imports the top level, preprocess and decode. Training lives in stackcls.train, loading a saved
model in stackcls.predict.
"""
