"""LoRA (Hu et al. 2021): ``W' = W + (alpha / r) B A`` with ``B`` starting at zero; no sparse part."""

from sparsepack.methods.base import Method, register

LORA = register(Method("lora", lowrank=True, sparse=False))
