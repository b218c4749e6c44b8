"""Every dictionary behind one interface; importing this package registers the built-in architectures."""

from saelab.saes.base import (
    ForwardOutput,
    Latents,
    SAEConfig,
    SparseAutoencoder,
    SparseLatents,
    architectures,
    create_sae,
    load_sae,
    register,
    to_dense,
)
from saelab.saes.batchtopk import BatchTopKSAE, BatchTopKSAEConfig
from saelab.saes.deep import DeepSAE, DeepSAEConfig
from saelab.saes.initialization import geometric_median, init_dictionary, seeded
from saelab.saes.jumprelu import JumpReLUSAE, JumpReLUSAEConfig
from saelab.saes.kernels import TopKSelection, release_workspace, sparse_decode, topk_encode, topk_encode_dense
from saelab.saes.matryoshka import MatryoshkaSAE, MatryoshkaSAEConfig
from saelab.saes.multilayer import MultiLayerSAE, MultiLayerSAEConfig
from saelab.saes.pretrained import load_saelens
from saelab.saes.relu import ReluSAE, ReluSAEConfig
from saelab.saes.shallow import ShallowSAE
from saelab.saes.topk import TopKSAE, TopKSAEConfig
from saelab.saes.transcoder import TopKTranscoder, TopKTranscoderConfig

__all__ = [
    "BatchTopKSAE",
    "BatchTopKSAEConfig",
    "DeepSAE",
    "DeepSAEConfig",
    "ForwardOutput",
    "JumpReLUSAE",
    "JumpReLUSAEConfig",
    "Latents",
    "MatryoshkaSAE",
    "MatryoshkaSAEConfig",
    "MultiLayerSAE",
    "MultiLayerSAEConfig",
    "ReluSAE",
    "ReluSAEConfig",
    "SAEConfig",
    "ShallowSAE",
    "SparseAutoencoder",
    "SparseLatents",
    "TopKSAE",
    "TopKSAEConfig",
    "TopKTranscoder",
    "TopKTranscoderConfig",
    "TopKSelection",
    "architectures",
    "create_sae",
    "geometric_median",
    "init_dictionary",
    "load_sae",
    "load_saelens",
    "register",
    "release_workspace",
    "seeded",
    "sparse_decode",
    "to_dense",
    "topk_encode",
    "topk_encode_dense",
]
