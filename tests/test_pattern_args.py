"""AttentionPattern's sizes are integers: a float or a bool is one sentence at construction, not a
traceback from the kernel's padding later."""
import pytest

from longctx.attention import AttentionPattern
from longctx.errors import LongctxError


@pytest.mark.parametrize("kw,name", [(dict(kind="blocks", block=2.0), "block"),
                                     (dict(kind="blockwise_causal", block=1.5), "block"),
                                     (dict(kind="sliding", window=2.5), "window"),
                                     (dict(kind="sliding", window=True), "window")])
def test_non_integer_sizes_are_one_sentence(kw, name):
    with pytest.raises(LongctxError, match=rf"attention {name} must be an integer, got {kw[name]!r}"):
        AttentionPattern(**kw)
