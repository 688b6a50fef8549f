"""The decode engine and the decoder protocol."""

from mtp_plugins.decoding.base import DECODER_API_VERSION, Decoder, Proposals
from mtp_plugins.decoding.engine import generate
from mtp_plugins.decoding.stats import GenerateOutput, GenerationStats, RowStats

__all__ = [
    "DECODER_API_VERSION",
    "Decoder",
    "GenerateOutput",
    "GenerationStats",
    "Proposals",
    "RowStats",
    "generate",
]
