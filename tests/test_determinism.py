"""Training is bit-reproducible with several threads: the gradient of a batch with padding, global tokens
and repeated positions is the same on every backward pass, for every attention variant of the default
comparison. (An index_put_ with accumulate -- the backward of ``weight[positions]`` -- sums repeated
indices in thread-timing order on CPU: the learned position table's gradient differed between passes and
finetuning scores between runs, while one-thread runs were identical.)"""
import pytest
import torch

from longctx.models import LongctxConfig, LongctxForQuestionAnswering

VARIANTS = {
    "full": {"attention": "full"},
    "sliding": {"attention": "sliding", "window": 4},
    "blocks": {"attention": {"type": "blocks", "block": 8}},
    "bigbird": {"attention": {"type": "bigbird", "block": 4, "random": 2, "global_blocks": 1}},
    "linformer": {"attention": {"type": "linformer", "k": 16}},
    "performer": {"attention": {"type": "performer", "nb_features": 16}},
    "nystrom": {"attention": {"type": "nystrom", "num_landmarks": 8, "conv_kernel_size": 3}},
    "lsh": {"attention": {"type": "lsh", "chunk_length": 8, "num_buckets": 4, "n_hashes": 2}},
}


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_are_identical_on_every_pass_with_two_threads(name, two_threads):
    torch.manual_seed(0)
    cfg = LongctxConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=64, hidden_dropout_prob=0.0, **VARIANTS[name])
    model = LongctxForQuestionAnswering(cfg)
    B, n = 16, 64
    ids = torch.randint(5, 300, (B, n))
    mask = torch.ones(B, n, dtype=torch.long)
    for b in range(B):
        mask[b, n - 3 * b:] = 0  # right padding of every length
    glob = torch.zeros(B, n, dtype=torch.long)
    glob[:, :5] = 1  # a question at the start
    batch = dict(input_ids=ids, attention_mask=mask, start_positions=torch.randint(5, 20, (B,)),
                 end_positions=torch.randint(20, 30, (B,)))
    # the approximate families take no global tokens (every token mixes the whole sequence already)
    batch["global_attention_mask"] = glob if name in ("full", "sliding", "blocks", "bigbird") else 0 * glob
    grads = []
    for _ in range(6):  # a race shows on some passes only
        model.zero_grad()
        model(**batch).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    for g in grads[1:]:
        assert [k for k in g if not torch.equal(g[k], grads[0][k])] == []
