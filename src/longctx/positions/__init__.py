"""Position encodings.

Added to the token embeddings (in the model): "learned" absolute, "sinusoidal".
Applied inside attention (in the layer): "rope" and "xpos" rotate q and k; "alibi" biases the scores.
"""
from longctx.positions.absolute import LearnedPositions, extend_learned_positions, sinusoidal_table
from longctx.positions.alibi import alibi_slopes
from longctx.positions.encoding import ALiBi, AbsoluteTable, PositionEncoding, RotaryPositions, in_attention
from longctx.positions.rotary import Rotary

POSITION_KINDS = ("none", "learned", "sinusoidal", "rope", "alibi", "xpos")

__all__ = ["POSITION_KINDS", "LearnedPositions", "extend_learned_positions", "sinusoidal_table",
           "alibi_slopes", "Rotary", "PositionEncoding", "AbsoluteTable", "RotaryPositions", "ALiBi",
           "in_attention"]
