"""What is computed: dense and mixture-of-experts transformer layers (Flax NNX).

Dimension legend, used in einsum strings and array names across podtrain:
  B batch, T query length, S key/value length, D model dim, N query heads, K kv heads,
  G heads per kv group, H head dim, F MLP hidden, E experts, C expert capacity, V vocab, L layers.
"""

from podtrain.model.config import ModelConfig
from podtrain.model.transformer import Transformer, init_cache

__all__ = ["ModelConfig", "Transformer", "init_cache"]
