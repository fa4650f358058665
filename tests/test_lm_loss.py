"""The held-out LM loss: the token-weighted mean of the model's own batch losses, with a 95% bootstrap
interval over held-out sequences."""
import pytest
import torch

from longctx.data.collate import CLMCollator, MLMCollator
from longctx.data.tokenizer import ByteTokenizer
from longctx.models import LongctxConfig, LongctxForCausalLM, LongctxForMaskedLM
from longctx.tasks.mlm import lm_loss


@pytest.mark.parametrize("causal", [False, True])
def test_lm_loss_is_the_token_weighted_mean_of_batch_losses_with_an_interval(causal):
    torch.manual_seed(0)
    tok = ByteTokenizer()
    cfg = LongctxConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        attention="sliding", window=4, max_position_embeddings=64, causal=causal,
                        pad_token_id=tok.pad_id, hidden_dropout_prob=0.0)
    model = (LongctxForCausalLM if causal else LongctxForMaskedLM)(cfg).eval()
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(5, 200, (48,), generator=g)} for _ in range(12)]
    collator = CLMCollator(tok) if causal else MLMCollator(tok, 0.3, seed=0)
    ev = lm_loss(model, data, collator, batches=4, batch_size=3, causal=causal)

    from longctx.data.collate import batch_order
    from longctx.tasks.mlm import EVAL_BATCH_OFFSET
    total = count = 0.0
    with torch.no_grad():
        for i in range(4):  # the model's own mean loss per batch, weighted by its predicted tokens
            idx = batch_order(len(data), 3, i, 0, shuffle=False)
            batch = collator([data[j] for j in idx], batch_index=EVAL_BATCH_OFFSET + i)
            lab = batch["labels"][:, 1:] if causal else batch["labels"]
            k = int((lab != -100).sum())
            total += float(model(**batch).loss) * k
            count += k
    assert ev["eval_tokens"] == count and ev["eval_sequences"] == 12
    assert ev["loss"] == pytest.approx(total / count, rel=1e-5)
    lo, hi = ev["loss_ci"]
    assert lo < ev["loss"] < hi and hi - lo < 1.0
