"""Sparse autoencoders: the model, sparsify/SAELens files, streaming training, evaluation, and a
planted-feature world to check them against.

    from msae.sae import SparseCoder, train_sae, evaluate_sae, save_sae, load_sae, load_pretrained
"""

from msae.sae.evaluate import EvalResult, LossRecovered, evaluate_sae, heldout_rows, loss_recovered
from msae.sae.formats import SAEFormatError, load_pretrained, load_sae, read_metadata, save_sae
from msae.sae.model import EncoderOutput, ForwardOutput, SparseCoder
from msae.sae.stream import ActivationStream, heldout_mask, modality_mask
from msae.sae.train import TrainResult, default_lr, train_sae

__all__ = [
    "ActivationStream", "EncoderOutput", "EvalResult", "ForwardOutput", "LossRecovered", "SAEFormatError",
    "SparseCoder", "TrainResult", "default_lr", "evaluate_sae", "heldout_mask", "heldout_rows", "load_pretrained",
    "load_sae", "loss_recovered", "modality_mask", "read_metadata", "save_sae", "train_sae",
]
