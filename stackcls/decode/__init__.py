"""Per-slice scores -> ordered labels: OAP...OAP, IN...IN, OBS...OBS from apex to base.

    ordered.py     the exact ordered decoding (dynamic programming), one stack or a padded batch
    boundaries.py  the exact distribution over IN ranges: range and boundary probabilities,
                   coverage, AHA levels

Pure functions over arrays; imports only stackcls.stack.
"""
