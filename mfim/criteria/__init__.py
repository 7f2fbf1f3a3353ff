"""One loss per module, as in pSp's criteria/: weights are the `loss.*` (λ) entries of params.yaml."""
